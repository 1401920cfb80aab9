"""`curate score`: an aesthetic / quality score per image (column `aesthetic`, float).

The model is an image-embedding backbone plus a small head (curate.common.embedder: a
local folder or a hub id, the same loading code). Each usable row's training file
(`path`: the crop when there is one) is decoded safely (curate.common.decode), scored
in batches, on CUDA when present. Resumable: scores are written back every
CHECKPOINT images, and a re-run with the same model scores only the rows still
without one (another model re-scores everything). The review app sorts and
thresholds by the column, the report draws its histogram.

`--min-aesthetic T` (`drop_below`) leaves rows scoring under T out of training the way
a person would: a review decision "drop" (reason "aesthetic 0.31 < 0.5", by
"curate score"), which every stage obeys and a person can undo in review. A row a person
decided on is left alone; a re-run with another threshold restores the rows it dropped
that now pass.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from curate.errors import CurateError

CHECKPOINT = 512  # images between manifest writes
WHO = "curate score"  # the `who` of the drop decisions --min-aesthetic writes


@dataclass
class Summary:
    manifest: str
    model: str = ""
    device: str = ""
    rows: int = 0
    scored: int = 0
    reused: int = 0
    failed: int = 0
    dropped: int = 0   # --min-aesthetic: newly dropped, restored
    restored: int = 0
    seconds: float = 0.0
    errors: list = field(default_factory=list)

    def lines(self) -> list[str]:
        rate = self.scored / self.seconds if self.seconds else 0.0
        return [f"score: {self.rows} rows: {self.scored} scored ({rate:.1f} images/s on {self.device}), "
                f"{self.reused} kept from an earlier run, {self.failed} unreadable",
                f"  model: {self.model}; column aesthetic in {self.manifest}"] + (
                [f"  --min-aesthetic: {self.dropped} rows dropped, {self.restored} restored (review decisions by "
                 f"'{WHO}'; undo or restore them in curate review)"] if self.dropped or self.restored else [])


def _decode(path: str):
    from curate.common.decode import ImageError, open_image

    try:
        return open_image(path)
    except (ImageError, OSError) as exc:
        return exc


def score_files(e, files: list[str], bs: int, s: Summary, keys: list, on_batch=None) -> list:
    """The per-shard work of both engines: a score per file (None: unreadable), in batches
    decoded beside the model. `on_batch(done rows, scores so far)` after each batch."""
    values = [None] * len(files)
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        for start in range(0, len(files), bs):
            idx = list(range(start, min(start + bs, len(files))))
            images = list(pool.map(_decode, [files[i] for i in idx]))
            ok = [(i, im) for i, im in zip(idx, images) if not isinstance(im, Exception)]
            for i, im in zip(idx, images):
                if isinstance(im, Exception):
                    s.failed += 1
                    s.errors.append(f"{keys[i]}: {im}")
            if ok:
                for (i, _), v in zip(ok, e.score([im for _, im in ok]).tolist()):
                    values[i] = float(v)
                s.scored += len(ok)
            if on_batch is not None:
                on_batch(idx, values)
    return values


class ShardScorer:
    """On a Ray actor: the model loaded once, then shards of (key, absolute file) rows scored."""

    def __init__(self, model: str, device: str, batch_size: int | None):
        from curate.common import embedder as emb

        self.e = emb.load(model, device, need_head=True)
        self.bs = batch_size or (64 if self.e.device.startswith("cuda") else 8)

    def __call__(self, rows):
        s = Summary("")
        keys = rows.column("key").to_pylist()
        values = score_files(self.e, rows.column("file").to_pylist(), self.bs, s, keys)
        out = pa.table({"key": rows.column("key"), "aesthetic": pa.array(values, pa.float32())})
        return out, {"scored": s.scored, "failed": s.failed, "errors": s.errors[:20]}


def _on_ray(rows: pa.Table, model: str, device: str, batch_size: int | None, manifest: Path, ray, s: Summary) -> list:
    from functools import partial

    from curate import engine

    if Path(model).exists():  # a local folder: the same one from every worker's folder
        model = str(Path(model).resolve())
    with engine.connect(ray) as cluster:
        gpu = cluster.gpus > 0 and device != "cpu"
        if device.startswith("cuda") and not gpu:
            raise CurateError(f"--device {device}: the Ray cluster has no GPU")
        actors = cluster.gpus if gpu else max(1, cluster.cpus // 2)
        factory = partial(ShardScorer, str(model), "cuda" if gpu else "cpu", batch_size)
        out, stats = cluster.map(factory, rows, engine.work_dir(manifest, "score"), actors=actors,
                                 num_gpus=1 if gpu else 0, num_cpus=1, desc="score",
                                 settings=f"score {model} {batch_size}")
    st = engine.sum_stats(stats)
    s.scored, s.failed, s.errors = st.get("scored", 0), st.get("failed", 0), st.get("errors", [])
    s.device = f"{'cuda' if gpu else 'cpu'}, {actors} Ray actor{'s' * (actors > 1)}"
    return out.column("aesthetic").to_pylist()


def run(manifest: str | os.PathLike, model: str, *, batch_size: int | None = None, device: str = "auto",
        progress=None, embedder=None, ray=None) -> Summary:
    """`ray`: curate.engine.RayOptions to score in shards on Ray actors (None: here)."""
    from curate import manifest as mf
    from curate.common import embedder as emb

    manifest = Path(manifest)
    table, meta = mf.read(manifest)
    s = Summary(str(manifest), model=str(model), rows=table.num_rows)
    if batch_size is not None and batch_size < 1:
        raise CurateError("--batch-size must be >= 1")
    same = (meta.get("stages") or {}).get("score", {}).get("model") == str(model) or \
        (meta.get("checkpoints") or {}).get("score") == str(model)
    old = table.column("aesthetic").to_pylist() if "aesthetic" in table.column_names and same else [None] * table.num_rows
    values = list(old)
    col = lambda c: table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows  # noqa: E731
    todo = [i for i, (p, err, v) in enumerate(zip(col("path"), col("error"), old)) if p and err is None and v is None]
    s.reused = sum(v is not None for v in old)

    def save(done: bool) -> None:
        out = mf.with_column(table, "aesthetic", pa.array(values, pa.float32()))
        if done:
            meta.get("checkpoints", {}).pop("score", None)
            mf.record_stage(meta, "score", model=str(model), scored=s.scored, failed=s.failed)
        else:
            meta.setdefault("checkpoints", {})["score"] = str(model)
        mf.write(out, manifest, meta)

    t0 = time.perf_counter()
    files = [str((manifest.parent / col("path")[i]).resolve()) for i in todo]
    keys = [col("key")[i] for i in todo]
    if ray is not None and todo:
        rows = pa.table({"key": pa.array(keys, pa.string()), "file": pa.array(files, pa.string())})
        for i, v in zip(todo, _on_ray(rows, model, device, batch_size, manifest, ray, s)):
            values[i] = v
    elif todo:
        e = embedder or emb.load(model, device, need_head=True)
        s.device = e.device
        since = [0]

        def on_batch(idx, got):
            for i in idx:
                values[todo[i]] = got[i]
            since[0] += len(idx)
            if progress is not None:
                progress(len(idx))
            if since[0] >= CHECKPOINT:
                save(False)
                since[0] = 0

        try:
            score_files(e, files, batch_size or (64 if e.device.startswith("cuda") else 8), s, keys, on_batch)
        except KeyboardInterrupt:
            save(False)
            raise CurateError(f"score: interrupted; {s.scored} scores kept, a re-run goes on", 130) from None
    s.seconds = time.perf_counter() - t0
    save(True)
    if ray is not None:
        from curate import engine

        engine.clean(manifest, "score")
    return s


def drop_below(manifest, threshold: float, s: Summary) -> None:
    """Review decisions for `--min-aesthetic`: drop the rows under it, restore the ones this
    command dropped earlier that now pass; rows a person decided on are theirs."""
    from curate import manifest as mf
    from curate.common import decisions

    table, _ = mf.read(manifest)
    d = decisions.current(manifest)
    last = {}
    for rec in d.log:
        last[rec["key"]] = rec
    lines = []
    for key, v in zip(table.column("key").to_pylist(), table.column("aesthetic").to_pylist()):
        rec = last.get(key)
        if v is None or (rec is not None and rec.get("who") != WHO):
            continue
        dropped = d.get(key).get("dropped") is not None
        if v < threshold and not dropped:
            lines.append({"key": key, "action": "drop", "reason": f"aesthetic {v:.3g} < {threshold:g}"})
        elif v >= threshold and dropped:
            lines.append({"key": key, "action": "restore"})
    if lines:
        decisions.append(manifest, lines, who=WHO)
    s.dropped = sum(x["action"] == "drop" for x in lines)
    s.restored = len(lines) - s.dropped
