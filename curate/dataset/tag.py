"""Tag stage: a WD v3 tagger's predictions -> the `tagger` column.

Per row: general tags above `general_threshold`, character tags above
`character_threshold` (or, with `mcut`, the thresholds MCut finds in that row's
scores, as the wd-tagger space does), best score first, then the rating: the
argmax of the rating labels, as one entry of category "rating". Scores are the
sigmoid of the model's logits. Rows with `error` or `dup_of` set, or no `path`,
are skipped; a file that cannot be decoded puts its reason into `error`.

Resumable: the model's fingerprint (sha256 of weights + tag list) and the
thresholds go into the provenance (stages.tag). A re-run with the same ones skips
rows whose `tagger` is set; with others, every row's `tagger` is cleared first and
re-tagged. The manifest is saved every few minutes and on Ctrl-C, so an interrupted
run continues where it stopped.

Throughput: DataLoader workers decode, pad and resize to uint8 -- JPEGs in draft
mode (DCT-domain downscale to >= the input size, then the same bicubic resize: on
average 0.1-0.2 of 255 levels off a full decode; draft=False is bit-exact);
the main process moves uint8 batches (pinned) to the device and normalises there,
under bf16/fp16 autocast and channels_last on CUDA, optionally torch.compile'd; the
next batch is launched before the previous one's scores are read back.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from curate import manifest as mf
from curate.dataset import tagger_model as tm
from curate.errors import CurateError

SAVE_EVERY_S = 300.0  # checkpoint interval for long runs


@dataclass(frozen=True)
class Thresholds:
    general: float = 0.35
    character: float = 0.85
    mcut: bool = False

    def check(self) -> None:
        for name, v in (("--general-threshold", self.general), ("--character-threshold", self.character)):
            if not 0.0 <= v <= 1.0:
                raise CurateError(f"{name} must be between 0 and 1, got {v}")


# --- choosing tags from scores -------------------------------------------------------


def mcut(scores: np.ndarray) -> float:
    """Maximum Cut threshold (Largeron et al. 2012): the middle of the largest gap between sorted scores."""
    if len(scores) < 2:
        return 1.0
    s = np.sort(scores)[::-1]
    gaps = s[:-1] - s[1:]
    t = int(np.argmax(gaps))
    return float((s[t] + s[t + 1]) / 2)


def pick(probs: np.ndarray, labels: tm.Labels, th: Thresholds) -> list[list[dict]]:
    """(rows, labels) scores -> per row [{tag, category, score}]: general, character (best first), rating."""
    gen, char, rating = labels.general, labels.index(tm.CHARACTER), labels.index(tm.RATING)
    out = []
    for p in probs:
        g_thr, c_thr = th.general, th.character
        if th.mcut:  # as the wd-tagger space: character MCut never below 0.15
            g_thr = mcut(p[gen])
            c_thr = max(0.15, mcut(p[char])) if len(char) else c_thr
        entries = []
        for idx, thr, category in ((gen, g_thr, "general"), (char, c_thr, "character")):
            chosen = idx[p[idx] > thr]
            for i in chosen[np.argsort(-p[chosen], kind="stable")]:
                entries.append({"tag": labels.names[i], "category": category, "score": float(p[i])})
        if len(rating):
            r = rating[int(np.argmax(p[rating]))]
            entries.append({"tag": labels.names[r], "category": "rating", "score": float(p[r])})
        out.append(entries)
    return out


# --- reading images (DataLoader workers) -------------------------------------------------


class Images:
    """Map-style dataset: (row, absolute path) -> (row, uint8 HWC RGB array | None, error | None)."""

    def __init__(self, jobs: list[tuple[int, str]], size: int, interpolation: str, crop_pct: float,
                 draft: bool = True):
        self.jobs, self.size, self.interpolation, self.crop_pct = jobs, size, interpolation, crop_pct
        self.draft = tm.draft_size(size, crop_pct) if draft else None

    def __len__(self) -> int:
        return len(self.jobs)

    def loader(self, batch_size: int, workers: int, device: str):
        """A DataLoader over these images: workers decode, the main process gets pinned uint8 batches."""
        from torch.utils.data import DataLoader

        return DataLoader(self, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                          pin_memory=device.startswith("cuda"), prefetch_factor=4 if workers else None)

    def __getitem__(self, i: int):
        from curate.common.decode import ImageError, open_image

        k, path = self.jobs[i]
        if not os.path.isfile(path):
            return k, None, "missing"
        try:
            img = open_image(path, draft_size=self.draft)
        except ImageError as exc:
            return k, None, f"tag: {exc}"
        return k, tm.prepare(img, self.size, self.interpolation, self.crop_pct), None


def collate(items):
    """Stack the decoded images (NHWC uint8 tensor, pinned by the DataLoader); pass failures through."""
    import torch

    ok = [(k, a) for k, a, _ in items if a is not None]
    failed = [(k, e) for k, a, e in items if a is None]
    x = torch.from_numpy(np.stack([a for _, a in ok])) if ok else None
    return [k for k, _ in ok], x, failed


def default_workers(device: str) -> int:
    n = os.cpu_count() or 1
    return min(16, n) if device.startswith("cuda") else max(1, n // 2)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CurateError(f"--device {device}: no CUDA device is available to torch here")
    return device


# --- running the model --------------------------------------------------------------------


class Runner:
    """Batches in (uint8 NHWC), probabilities out, one batch behind on CUDA so the GPU never waits."""

    def __init__(self, tagger: tm.Tagger, device: str, batch_size: int, compile: bool = False):
        import torch

        self.t, self.device, self.batch_size = tagger, torch.device(device), batch_size
        self.cuda = self.device.type == "cuda"
        self.pending = None
        if tagger.backend != "timm":
            return
        model = tagger.model
        if self.cuda:
            model = model.to(memory_format=torch.channels_last)
            bf16 = torch.cuda.is_bf16_supported()
            self.autocast = torch.autocast("cuda", dtype=torch.bfloat16 if bf16 else torch.float16)
        else:
            self.autocast = nullcontext()  # CPU stays float32: the scores match the reference
        self.compiled = compile
        self.model = torch.compile(model) if compile else model

    def submit(self, keys: list[int], x) -> list[tuple[list[int], np.ndarray]]:
        """Queue a batch; returns the results that are ready (the previous batch on CUDA)."""
        if self.t.backend == "onnx":
            return [(keys, self._onnx(x))]
        import torch

        n = x.shape[0]
        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            x = tm.normalize(x, self.t.mean, self.t.std)
            x = x.contiguous(memory_format=torch.channels_last) if self.cuda else x.contiguous()
            if self.compiled and n < self.batch_size:  # one shape: no recompilation for the last batch
                x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
            with self.autocast:
                logits = self.model(x)
            probs = torch.sigmoid(logits[:n].float())
            if not self.cuda:
                return [(keys, probs.numpy())]
            host = torch.empty(probs.shape, dtype=probs.dtype, pin_memory=True)
            host.copy_(probs, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        ready, self.pending = self.flush(), (keys, host, event)
        return ready

    def flush(self) -> list[tuple[list[int], np.ndarray]]:
        if self.pending is None:
            return []
        keys, host, event = self.pending
        self.pending = None
        event.synchronize()
        return [(keys, host.numpy())]

    def _onnx(self, x) -> np.ndarray:
        arr = x.numpy()[..., ::-1].astype(np.float32)  # the WD ONNX input: NHWC, BGR, 0..255
        n, fixed = arr.shape[0], self.t.batch
        if fixed and n < fixed:  # a fixed batch dimension: the last batch is padded, the padding dropped
            arr = np.concatenate([arr, np.zeros((fixed - n, *arr.shape[1:]), arr.dtype)])
        session = self.t.model
        return session.run(None, {session.get_inputs()[0].name: arr})[0][:n].astype(np.float32)


# --- the stage ----------------------------------------------------------------------------


@dataclass
class Summary:
    manifest: str = ""
    rows: int = 0
    tagged: int = 0
    done_before: int = 0
    retag: bool = False
    skipped_dups: int = 0
    skipped_error: int = 0
    skipped_no_path: int = 0
    missing: int = 0
    failed: Counter = field(default_factory=Counter)
    errors: list = field(default_factory=list)
    seconds: float = 0.0
    device: str = ""
    backend: str = ""
    model: str = ""
    settings: dict = field(default_factory=dict)
    interrupted: bool = False
    notes: list = field(default_factory=list)

    def lines(self) -> list[str]:
        rate = self.tagged / self.seconds if self.seconds > 0 else 0.0
        how = f" ({rate:.1f} images/s, {self.backend} on {self.device})" if self.backend else ""
        out = [f"tag: {self.rows} rows: {self.tagged} tagged{how}, "
               f"{self.done_before} tagged before, {sum(self.failed.values())} failed"
               + (" -- interrupted, re-run to continue" if self.interrupted else "")]
        if self.retag:
            out.append("  model or thresholds changed since the last run: earlier tags cleared, every row re-tagged")
        out.append(f"  skipped: {self.skipped_dups} duplicates, {self.skipped_error} with an error, "
                   f"{self.skipped_no_path} without a path, {self.missing} files missing on disk")
        if self.failed:
            out.append("  failures by reason: " + ", ".join(f"{r} {n}" for r, n in self.failed.most_common()))
        out += [f"  failed: {e}" for e in self.errors[:5]]
        s = self.settings
        how = ("MCut" if s.get("mcut") else
               f"general > {s.get('general_threshold')}, character > {s.get('character_threshold')}")
        out.append(f"  model: {self.model} ({how})")
        out += [f"  note: {n}" for n in dict.fromkeys(self.notes)]
        out.append(f"  manifest: {self.manifest} (column tagger)")
        return out


def run(manifest: str | os.PathLike, model: str, *, batch_size: int | None = None, device: str = "auto",
        general_threshold: float = 0.35, character_threshold: float = 0.85, use_mcut: bool = False,
        workers: int | None = None, compile: bool = False, draft: bool = True, progress: bool = True,
        save_every_s: float = SAVE_EVERY_S, ray=None) -> Summary:
    """Tag the manifest's images in place; returns what happened.

    `ray`: curate.engine.RayOptions to tag on Ray actors (one per GPU; CPU-only: one per
    2 cores), each loading the model once; None: here.
    """
    th = Thresholds(general_threshold, character_threshold, use_mcut)
    th.check()
    if batch_size is not None and batch_size < 1:
        raise CurateError(f"--batch-size must be at least 1, got {batch_size}")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise CurateError(f"--device must be cpu, cuda or auto, got {device!r}")
    manifest = Path(manifest)
    table, meta = mf.read(manifest)
    files = tm.locate(model)  # before torch is imported: a wrong --model fails fast
    settings = {"fingerprint": tm.fingerprint(files, tm.weights_file(files)), "general_threshold": th.general,
                "character_threshold": th.character, "mcut": th.mcut}
    last = meta.get("stages", {}).get("tag", {})
    same = bool(last) and all(last.get(k) == v for k, v in settings.items())

    col = lambda name: table.column(name).to_pylist()  # noqa: E731
    err, earlier = col("error"), col("tagger")
    tags = earlier if same else [None] * table.num_rows  # other model/thresholds: start afresh
    s = Summary(manifest=str(manifest), rows=table.num_rows, device=device, model=files.model_id, settings=settings,
                retag=not same and any(v is not None for v in earlier))
    jobs = pending_rows(table, tags, manifest.parent, s)
    backend = {}

    def save(complete: bool) -> None:
        mf.record_stage(meta, "tag", model=files.model_id, revision=files.revision, **settings, **backend,
                        complete=complete)
        t = mf.with_column(table, "tagger", tags)
        mf.write(mf.with_column(t, "error", err), manifest, meta)

    if jobs and ray is not None:
        _tag_on_ray(table, jobs, files, th, settings, tags, err, s, ray, device, batch_size, workers, compile, draft)
        backend.update(backend=s.backend)
    elif jobs:
        device = resolve_device(device)
        tagger = tm.load(files, device)
        backend.update(backend=tagger.backend, input_size=tagger.size)
        s.device, s.backend = device, tagger.backend
        s.model = tagger.model_id + (f"@{tagger.revision[:10]}" if tagger.revision else "")
        score(jobs, tagger, device, batch_size, workers, compile, draft, th, tags, err, col("key"), s, progress,
              lambda: save(False), save_every_s)
    save(not s.interrupted)
    if ray is not None:
        from curate import engine

        engine.clean(manifest, "tag")
    return s


def score(jobs, tagger: tm.Tagger, device: str, batch_size: int | None, workers: int | None, compile: bool,
          draft: bool, th: Thresholds, tags: list, err: list, keys: list, s: Summary, progress: bool = True,
          checkpoint=None, save_every_s: float = SAVE_EVERY_S) -> None:
    """The per-shard work of both engines: tag `jobs` (row, image path) into `tags` / `err`."""
    bs = batch_size or (128 if device.startswith("cuda") else 4)  # CPU: bigger batches only thrash the caches
    if tagger.batch and tagger.batch != bs:  # an ONNX export with a fixed batch dimension
        s.notes.append(f"the model takes batches of exactly {tagger.batch}: batch size {tagger.batch}"
                       + (f" (not --batch-size {batch_size})" if batch_size else ""))
        bs = tagger.batch
    nw = default_workers(device) if workers is None else max(0, workers)
    loader = Images(jobs, tagger.size, tagger.interpolation, tagger.crop_pct, draft).loader(bs, nw, device)
    tag_batches(loader, Runner(tagger, device, bs, compile), tagger.labels, th, tags, err, keys, s,
                nw, progress, checkpoint or (lambda: None), save_every_s)


class ShardTagger:
    """On a Ray actor: the model loaded once, then shards of (key, absolute path) rows scored."""

    def __init__(self, files: tm.ModelFiles, device: str, th: Thresholds, batch_size: int | None,
                 workers: int | None, compile: bool, draft: bool):
        self.tagger = tm.load(files, device)
        self.device, self.th, self.batch_size, self.workers = device, th, batch_size, workers
        self.compile, self.draft = compile, draft

    def __call__(self, rows):
        import pyarrow as pa

        from curate.schema import MANIFEST_SCHEMA

        keys, paths = rows.column("key").to_pylist(), rows.column("file").to_pylist()
        tags, err, s = [None] * len(keys), [None] * len(keys), Summary()
        score(list(enumerate(paths)), self.tagger, self.device, self.batch_size, self.workers, self.compile,
              self.draft, self.th, tags, err, keys, s, progress=False)
        out = pa.table({"key": rows.column("key"), "tagger": pa.array(tags, MANIFEST_SCHEMA.field("tagger").type),
                        "error": pa.array(err, pa.string())})
        return out, {"tagged": s.tagged, "missing": s.missing, "failed": dict(s.failed), "errors": s.errors[:20],
                     "backend": {self.tagger.backend: 1}}


def _tag_on_ray(table, jobs, files, th, settings, tags, err, s: Summary, ray, device, batch_size, workers,
                compile, draft) -> None:
    """The pending rows in shards over Ray actors (num_gpus=1 each where the cluster has GPUs)."""
    from functools import partial

    import pyarrow as pa

    from curate import engine

    rows = pa.table({"key": table.column("key").take([k for k, _ in jobs]),
                     "file": pa.array([p for _, p in jobs], pa.string())})
    with engine.connect(ray) as cluster:
        gpu = cluster.gpus > 0 and device != "cpu"
        if device.startswith("cuda") and not gpu:
            raise CurateError(f"--device {device}: the Ray cluster has no GPU")
        device = "cuda" if gpu else "cpu"
        actors = cluster.gpus if gpu else max(1, cluster.cpus // 2)
        per_actor = max(1, cluster.cpus_per_gpu) if gpu else 1  # a GPU actor's cores decode for it
        nw = (per_actor if gpu else 0) if workers is None else workers
        factory = partial(ShardTagger, files, device, th, batch_size, nw, compile, draft)
        t0 = time.perf_counter()
        out, stats = cluster.map(factory, rows, engine.work_dir(Path(s.manifest), "tag"), actors=actors,
                                 num_gpus=1 if gpu else 0, num_cpus=per_actor, desc="tag",
                                 settings=f"tag {settings} {device} {batch_size} {draft}")
        s.seconds = time.perf_counter() - t0
    for (k, _), entries, e in zip(jobs, out.column("tagger").to_pylist(), out.column("error").to_pylist()):
        tags[k] = entries
        if e is not None:
            err[k] = e
    st = engine.sum_stats(stats)
    s.tagged += st.get("tagged", 0)
    s.missing += st.get("missing", 0)
    s.failed.update(st.get("failed", {}))
    s.errors += st.get("errors", [])
    s.device = f"{device}, {actors} Ray actor{'s' * (actors > 1)}"
    s.backend = ",".join(st.get("backend", {})) or s.backend


def pending_rows(table, tags: list, base: Path, s: Summary) -> list[tuple[int, str]]:
    """(row, image path) of the rows to tag; counts the others into the summary."""
    col = lambda name: table.column(name).to_pylist()  # noqa: E731
    err, path, dup = col("error"), col("path"), col("dup_of")
    jobs = []
    for k in range(table.num_rows):
        if err[k] is not None:
            s.skipped_error += 1
        elif dup[k] is not None:
            s.skipped_dups += 1
        elif not path[k]:
            s.skipped_no_path += 1
        elif tags[k] is not None:
            s.done_before += 1
        elif not (base / path[k]).is_file():  # not the row's error: the file may come back
            s.missing += 1
        else:
            jobs.append((k, str(base / path[k])))
    return jobs


def tag_batches(loader, runner: Runner, labels: tm.Labels, th: Thresholds, tags: list, err: list, keys: list,
                s: Summary, workers: int, progress: bool, checkpoint, save_every_s: float) -> None:
    """The loop: decoded batches in, `tags` / `err` filled; checkpoints now and then; Ctrl-C stops cleanly."""
    import torch
    from tqdm import tqdm

    threads = torch.get_num_threads()
    if not runner.cuda and workers:  # decode workers and the model share the cores: no oversubscription
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - workers)))
    bar = tqdm(total=len(loader.dataset), desc="tag", unit="img", unit_scale=True,
               disable=None if progress else True, leave=False, smoothing=0.1)

    def take(results) -> None:
        for row_keys, probs in results:
            for k, entries in zip(row_keys, pick(probs, labels, th)):
                tags[k] = entries
            s.tagged += len(row_keys)
            bar.update(len(row_keys))

    t0 = last_save = time.perf_counter()
    try:
        for row_keys, x, failed in loader:
            for k, e in failed:
                if e == "missing":  # gone since pending_rows looked
                    s.missing += 1
                else:
                    err[k] = e
                    s.failed[e.split(":")[1].strip() if e.count(":") >= 2 else e] += 1
                    s.errors.append(f"{keys[k]}: {e}")
                bar.update(1)
            if x is not None:
                take(runner.submit(row_keys, x))
            if time.perf_counter() - last_save > save_every_s:
                checkpoint()
                last_save = time.perf_counter()
        take(runner.flush())
    except KeyboardInterrupt:  # keep what is done; the caller reports and exits non-zero
        s.interrupted = True
        take(runner.flush())
    finally:
        s.seconds = time.perf_counter() - t0
        bar.close()
        torch.set_num_threads(threads)
