"""`curate artists --like CG.parquet --model M`: artists whose drawings look like a CG set.

The vertical half of the recipe's reg set is artists who "imitate the celluloid / Blue
Archive style", a hand-written list today. Here: the candidates are `curate artists`'
(copyright or tags, fav_count, min posts); of each, a sample of posts chosen by a
keyed hash of the seed and the post id (deterministic, source-blind) is embedded with
an image-embedding model (curate.common.embedder) and compared with the CG set's
embeddings: the score is the cosine between the two mean directions. The ranked list
is written as an artists file with each score and the post ids used, to edit by hand.

Images: a file already on disk under --images (download's content-addressed layout
<md5[:2]>/<md5>.<ext>) is used as is; else the small variant from the site (Danbooru's
sample, then the file URL), fetched through the source's own session when it has one
(curate.http's per-host rate limit is shared with it) within --max-requests.
Embeddings are cached by md5 (per model) under --cache: a re-run fetches and embeds
only what is new.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from curate.errors import CurateError
from curate.metadata.query import Range, Subset
from curate.metadata.select import BatchColumns, StoreColumns, eligible, keyed_hash

_MD5 = re.compile(r"^[0-9a-f]{32}$")
_DONMAI = re.compile(r"^(https?://[^/]*donmai\.us)/original/([0-9a-f]{2})/([0-9a-f]{2})/([0-9a-f]{32})\.\w+$")


@dataclass
class LikeRow:
    artist: str
    score: float
    posts: int
    sample: list[int] = field(default_factory=list)  # post ids embedded
    files: list = field(default_factory=list)        # their images on disk (None: not kept)


@dataclass
class LikeSummary:
    rows: list[LikeRow] = field(default_factory=list)
    cg_images: int = 0
    embedded: int = 0
    cached: int = 0
    fetched: int = 0
    on_disk: int = 0
    missing: int = 0
    budget_left: int | None = None
    cg_files: list = field(default_factory=list)


def _candidates(source, rule: Subset) -> dict[str, list[tuple[int, str | None, str | None]]]:
    """artist -> [(post id, md5, file_url)] of the eligible posts."""
    store = getattr(source, "store", None)
    aliases = store.aliases if store is not None else {}
    posts: dict[str, list] = defaultdict(list)

    def collect(cols, table_of):
        rows = np.flatnonzero(eligible(cols, rule, aliases))
        if not len(rows):
            return
        t = table_of(rows)
        for names, pid, md5, url in zip(cols.artists(rows), t.column("post_id").to_pylist(),
                                        t.column("md5").to_pylist(), t.column("file_url").to_pylist()):
            for name in names:
                posts[name].append((pid, md5, url))

    if store is not None:
        collect(StoreColumns(store), store.take)
    else:
        from curate.metadata.query import Query

        q = Query("artists", 0, None, [rule], "", "")
        for batch in source.batches_for(q) if hasattr(source, "batches_for") else source.batches():
            cols = BatchColumns(batch)
            collect(cols, lambda rows, b=batch: b.take(rows))
    return posts


def seeded_sample(posts: list, k: int, seed: int) -> list:
    """k posts by a keyed hash of (seed, post id): the same sample from every source."""
    pids = np.array([p[0] for p in posts], np.int64)
    order = np.lexsort((pids, keyed_hash(seed, pids)))
    return [posts[i] for i in order[:k]]


class _Images:
    """An image per md5: on disk, in the cache, or fetched (small variant first)."""

    def __init__(self, images: Path | None, cache: Path, session, budget: int | None, s: LikeSummary):
        self.images, self.cache, self.session, self.budget, self.s = images, cache, session, budget, s

    def local(self, md5: str | None, url: str | None) -> tuple[Path | None, bool, Path]:
        """(the file already here or None, whether it is under --images, where a fetch goes)."""
        if md5 and _MD5.match(md5) and self.images is not None:
            for p in (self.images / md5[:2]).glob(f"{md5}.*"):
                return p, True, p
        key = md5 if md5 and _MD5.match(md5) else hashlib.sha256((url or "").encode()).hexdigest()[:32]
        dst = self.cache / "images" / f"{key}.img"
        return (dst if dst.is_file() else None), False, dst

    def path(self, md5: str | None, url: str | None) -> Path | None:
        here, on_disk, dst = self.local(md5, url)
        if here is not None:
            self.s.on_disk += on_disk
            return here
        for u in self._urls(url):
            if self.budget is not None and self.budget <= 0:
                raise CurateError("artists --like: --max-requests used up; a re-run goes on from the cache")
            if self.budget is not None:
                self.budget -= 1
            try:
                r = self.session.get(u, timeout=60)
            except Exception:  # a network failure is a missing image, not a failed run
                continue
            if r.status_code == 200 and r.content:
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_suffix(".part")
                tmp.write_bytes(r.content)
                tmp.replace(dst)
                self.s.fetched += 1
                return dst
        return None

    @staticmethod
    def _urls(url: str | None) -> list[str]:
        if not url:
            return []
        m = _DONMAI.match(url)
        return [f"{m.group(1)}/sample/{m.group(2)}/{m.group(3)}/sample-{m.group(4)}.jpg", url] if m else [url]


class _Embeddings:
    """Embeddings cached by md5 (or file digest) per model: one .npy each."""

    def __init__(self, embedder, cache: Path, s: LikeSummary):
        self.e, self.s = embedder, s
        self.folder = cache / "embeddings" / hashlib.sha256(str(embedder.model_id).encode()).hexdigest()[:12]

    def has(self, key: str) -> bool:
        return (self.folder / f"{key}.npy").is_file()

    def get(self, items: list[tuple[str, Path | None]], batch: int = 16) -> dict[str, np.ndarray]:
        """{key: embedding} for (key, image file) items; unreadable files are left out."""
        from curate.common.decode import ImageError, open_image

        out, todo = {}, []
        for key, path in items:
            f = self.folder / f"{key}.npy"
            if f.is_file():
                out[key] = np.load(f)
                self.s.cached += 1
            elif path is not None:
                todo.append((key, path))
        for start in range(0, len(todo), batch):
            chunk, ims = [], []
            for key, path in todo[start:start + batch]:
                try:
                    ims.append(open_image(path))
                    chunk.append(key)
                except (ImageError, OSError):
                    self.s.missing += 1
            if not ims:
                continue
            self.folder.mkdir(parents=True, exist_ok=True)
            for key, v in zip(chunk, self.e.embed(ims)):
                np.save(self.folder / f"{key}.npy", v)
                out[key] = v
                self.s.embedded += 1
        return out


def _cg_items(path) -> list[tuple[str, Path]]:
    from curate import manifest
    from curate.common import decisions

    table, _ = manifest.read(path)
    review = decisions.current(path)
    table = review.applied(table)
    cols = [c for c in ("key", "path", "error", "dup_of", "sha256", "md5") if c in table.column_names]
    out = []
    for r in table.select(cols).to_pylist():
        if r.get("error") or r.get("dup_of") or not r.get("path") or r["key"] in review.dropped:
            continue
        f = Path(path).parent / r["path"]
        digest = r.get("md5") or (r.get("sha256") or hashlib.sha256(str(f.resolve()).encode()).hexdigest())[:32]
        out.append((digest, f))
    if not out:
        raise CurateError(f"--like {path}: no usable rows with an image on disk")
    return out


def _direction(vectors) -> np.ndarray:
    m = np.mean(np.stack(list(vectors)), axis=0)
    return m / max(float(np.linalg.norm(m)), 1e-12)


def rank_like(like, source, model, copyright: str | None = None, tags: list[str] = (), fav_count: str = ">30",
              min_posts: int = 5, top: int | None = None, sample: int = 8, seed: int = 0, images=None,
              cache=None, max_requests: int | None = None, device: str = "auto", embedder=None) -> LikeSummary:
    from curate import http
    from curate.common import embedder as emb

    if sample < 1:
        raise CurateError("--sample must be >= 1")
    like = Path(like)
    cache = Path(cache) if cache else like.parent / ".curate_artists_like"
    s = LikeSummary(budget_left=max_requests)
    e = embedder or emb.load(model, device)
    embeddings = _Embeddings(e, cache, s)
    cg = embeddings.get(_cg_items(like))
    if not cg:
        raise CurateError(f"--like {like}: none of its images could be read")
    s.cg_images = len(cg)
    s.cg_files = [f for _, f in _cg_items(like)]
    target = _direction(cg.values())
    rule = Subset(name="artists", tags=([copyright] if copyright else []) + list(tags),
                  fav_count=Range.parse(fav_count, "--fav-count"))
    posts = {a: p for a, p in _candidates(source, rule).items() if len(p) >= min_posts}
    fetch = _Images(Path(images) if images else None, cache, getattr(source, "http", None) or http.session(),
                    max_requests, s)
    for artist in sorted(posts):
        chosen = seeded_sample(posts[artist], sample, seed)
        keys = [md5 if md5 and _MD5.match(md5) else f"post{pid}" for pid, md5, _ in chosen]
        items = [(k, None if embeddings.has(k) else fetch.path(md5, url))  # a cached embedding needs no image
                 for k, (pid, md5, url) in zip(keys, chosen)]
        vecs = embeddings.get(items)
        used = [(pid, fetch.local(md5, url)[0]) for (pid, md5, url), (key, _) in zip(chosen, items) if key in vecs]
        if not used:
            continue
        score = float(_direction([vecs[k] for k, _ in items if k in vecs]) @ target)
        s.rows.append(LikeRow(artist, score, len(posts[artist]), [p for p, _ in used], [f for _, f in used]))
    s.rows.sort(key=lambda r: (-r.score, r.artist))
    s.rows = s.rows[:top] if top else s.rows
    s.budget_left = fetch.budget
    return s


def write_like_file(rows: list[LikeRow], path, header: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {line}" for line in header.splitlines()]
    lines.append("# ranked by likeness to the CG set (cosine of mean image embeddings); edit freely")
    lines += [f"{r.artist:<40} # like={r.score:.4f} posts={r.posts} sample={','.join(map(str, r.sample))}"
              for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_like_page(rows: list[LikeRow], cg_files: list, path, title: str) -> Path:
    """An HTML page beside the artists file: each listed artist's sample beside its score,
    under the CG set (thumbnails in <page>_files/, curate.common.thumbs)."""
    import html
    from types import SimpleNamespace

    from curate.common.thumbs import Thumbs

    path = Path(path)
    thumbs = Thumbs(path.parent / (path.stem + "_files"))
    cg = [thumbs.want(Path(f)) for f in cg_files[:24]]
    per = [[(pid, thumbs.want(Path(f)) if f else None) for pid, f in zip(r.sample, r.files)] for r in rows]
    thumbs.make(SimpleNamespace(thumbs_reused=0, thumbs_made=0, thumbs_failed=0))
    e = lambda x: html.escape(str(x), quote=True)  # noqa: E731
    img = lambda name, alt: (f'<img src="{e(thumbs.folder.name)}/{e(name)}" alt="{e(alt)}" title="{e(alt)}" loading="lazy">'  # noqa: E731
                             if name and thumbs.info(name) else f'<span class="noimg">{e(alt)}</span>')
    out = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title><style>'
           "body{font:14px system-ui,sans-serif;margin:20px}img{height:110px;margin:2px}"
           ".row{display:flex;align-items:center;gap:12px;border-top:1px solid #ddd;padding:6px 0}"
           ".who{width:260px}.noimg{display:inline-block;width:80px;color:#888}</style></head><body>",
           f"<h1>{e(title)}</h1><h2>The CG set</h2><div>{''.join(img(n, 'cg') for n in cg)}</div>",
           "<h2>Artists, most alike first</h2>"]
    for r, sample in zip(rows, per):
        out.append(f'<div class="row"><div class="who"><b>{e(r.artist)}</b><br>like {r.score:.3f}<br>'
                   f'{len(r.sample)} of {r.posts} posts</div><div>'
                   + "".join(img(n, f"post {pid}") for pid, n in sample) + "</div></div>")
    out.append("</body></html>")
    path.write_text("".join(out), encoding="utf-8")
    return path
