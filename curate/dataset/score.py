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


def run(manifest: str | os.PathLike, model: str, *, batch_size: int | None = None, device: str = "auto",
        progress=None, embedder=None) -> Summary:
    from curate import manifest as mf
    from curate.common import embedder as emb

    manifest = Path(manifest)
    table, meta = mf.read(manifest)
    s = Summary(str(manifest), model=str(model), rows=table.num_rows)
    e = embedder or emb.load(model, device, need_head=True)
    s.device = e.device
    same = (meta.get("stages") or {}).get("score", {}).get("model") == str(model) or \
        (meta.get("checkpoints") or {}).get("score") == str(model)
    old = table.column("aesthetic").to_pylist() if "aesthetic" in table.column_names and same else [None] * table.num_rows
    values = list(old)
    col = lambda c: table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows  # noqa: E731
    todo = [i for i, (p, err, v) in enumerate(zip(col("path"), col("error"), old)) if p and err is None and v is None]
    s.reused = sum(v is not None for v in old)
    bs = batch_size or (64 if e.device.startswith("cuda") else 8)
    if bs < 1:
        raise CurateError("--batch-size must be >= 1")

    def save(done: bool) -> None:
        out = mf.with_column(table, "aesthetic", pa.array(values, pa.float32()))
        if done:
            meta.get("checkpoints", {}).pop("score", None)
            mf.record_stage(meta, "score", model=str(model), scored=s.scored, failed=s.failed)
        else:
            meta.setdefault("checkpoints", {})["score"] = str(model)
        mf.write(out, manifest, meta)

    t0, since = time.perf_counter(), 0
    files = [str(manifest.parent / col("path")[i]) for i in todo]
    try:
        with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:  # decode beside the model
            for start in range(0, len(todo), bs):
                rows = todo[start:start + bs]
                images = list(pool.map(_decode, files[start:start + bs]))
                ok = [(r, im) for r, im in zip(rows, images) if not isinstance(im, Exception)]
                for r, im in zip(rows, images):
                    if isinstance(im, Exception):
                        s.failed += 1
                        s.errors.append(f"{col('key')[r]}: {im}")
                if ok:
                    for (r, _), v in zip(ok, e.score([im for _, im in ok]).tolist()):
                        values[r] = float(v)
                    s.scored += len(ok)
                since += len(rows)
                if progress is not None:
                    progress(len(rows))
                if since >= CHECKPOINT:
                    save(False)
                    since = 0
    except KeyboardInterrupt:
        save(False)
        raise CurateError(f"score: interrupted; {s.scored} scores kept, a re-run goes on", 130) from None
    s.seconds = time.perf_counter() - t0
    save(True)
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
