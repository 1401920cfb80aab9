"""`curate report`: one HTML page to review manifests before training.

Sections: counts per subset and failures by reason; contact sheets per subset;
duplicate clusters (keeper marked); crop boxes on the originals; top tags per subset;
aspect-ratio and bucket distribution; caption examples.

The page needs no network: CSS and charts are inline (bars are plain HTML). Images
are JPEG thumbnails in `<report name>_files/` beside it, `loading="lazy"`, so a page
of thousands of rows opens at once. A thumbnail is named by the source file's path,
size and mtime: a re-run makes only the missing ones, and drops ones no longer used.
Images are decoded with curate.common.decode.open_image (pixel guard, alpha on white).
"""

from __future__ import annotations

import html
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from curate import manifest
from curate.common import decisions
from curate.common.buckets import RECIPE_BUCKETS
from curate.common.thumbs import Thumbs
from curate.errors import CurateError
from curate.report import judgement
from curate.report.inspect import reason_of

FILES = "\x00files/"  # placeholder for the thumbnails folder in image URLs
COLUMNS = ["key", "subset", "width", "height", "path", "source_path", "error", "dup_of", "keeper_reason", "crop",
           "tagger", "caption", "tags_general", "tags_character", "tags_copyright",
           *judgement.COLUMNS[:3], judgement.COLUMNS[5]]  # issue 27: how a copy matched, sharpness, resolution, score
ASPECT_BINS = [  # (upper bound of width/height, label)
    (0.58, "taller than 9:16"), (0.7, "9:16 .. 2:3"), (0.85, "2:3 .. 4:5"), (1.18, "about square"),
    (1.45, "5:4 .. 3:2"), (1.85, "3:2 .. 16:9"), (float("inf"), "wider than 16:9")]


@dataclass
class Row:
    m: int              # manifest index
    base: Path          # the manifest's folder (paths are relative to it)
    data: dict

    def file(self, original: bool = False) -> Path | None:
        rel = (self.data["source_path"] if original else None) or self.data["path"]
        return self.base / rel if rel else None

    @property
    def kept(self) -> bool:
        """Not failed, not a duplicate: what training will see (charts count these)."""
        return not self.data["error"] and not self.data["dup_of"]

    @property
    def usable(self) -> bool:
        """Kept and on disk (contact sheets show these)."""
        return self.kept and bool(self.data["path"])


@dataclass
class Summary:
    out: Path
    rows: int = 0
    thumbs_made: int = 0
    thumbs_reused: int = 0
    thumbs_failed: int = 0
    sections: list = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"report: {self.rows} rows -> {self.out}",
                f"  thumbnails: {self.thumbs_made} made, {self.thumbs_reused} reused, {self.thumbs_failed} unreadable "
                f"(in {self.out.parent / (self.out.stem + '_files')})",
                f"  open: {self.out.resolve().as_uri()}"]


# --- thumbnails --------------------------------------------------------------------


# --- building the page ---------------------------------------------------------------


def load(paths: list[Path]) -> tuple[list[Row], list[dict]]:
    rows, metas = [], []
    loaded = [(*manifest.read(p), decisions.current(p)) for p in paths]
    losers = decisions.cross_losers([(t, d) for t, _, d in loaded])  # keepers chosen across manifests
    for i, (p, (table, meta, review)) in enumerate(zip(paths, loaded)):
        table, dropped = review.applied(table), review.dropped  # dropped rows left out, keepers followed
        cols = [c for c in COLUMNS if c in table.column_names]
        for d in table.select(cols).to_pylist():
            if d["key"] not in dropped:
                if d["key"] in losers:
                    d["dup_of"] = losers[d["key"]]
                rows.append(Row(i, p.parent, d))
        metas.append({"path": str(p), "name": p.stem, **meta})
    return rows, metas


def build(paths: list[str | Path], out: str | Path, title: str | None = None, config: str | Path | None = None,
          max_per_subset: int = 0, workers: int | None = None) -> Summary:
    paths = [Path(p) for p in paths]
    if not paths:
        raise CurateError("name at least one manifest")
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise CurateError(f"--out must be an .html file, not {out}")
    buckets = _buckets(config)
    rows, metas = load(paths)
    thumbs = Thumbs(out.parent / (out.stem + "_files"), workers)
    s = Summary(out, rows=len(rows))
    by_subset = _by_subset(rows, metas)
    # What each section shows decides which thumbnails are needed.
    sheets = {k: [r for r in v if r.usable][: max_per_subset or None] for k, v in by_subset.items()}
    for v in sheets.values():
        for r in v:
            r.data["_thumb"] = thumbs.want(r.file())
    clusters = _clusters(rows)
    for keeper, dups in clusters:
        for r in [keeper, *dups] if keeper else dups:
            r.data["_orig"] = thumbs.want(r.file(original=True))
    cropped = [r for r in rows if _trimmed_share(r) > 0 and r.data["source_path"] and not r.data["error"]]
    cropped.sort(key=lambda r: -_trimmed_share(r))
    cropped = cropped[:200]
    for r in cropped:
        r.data["_orig"] = thumbs.want(r.file(original=True))
    captions = {k: [r for r in v if r.usable and r.data["caption"]][:8] for k, v in by_subset.items()}
    for v in captions.values():
        for r in v:
            r.data["_thumb"] = thumbs.want(r.file())
    thumbs.make(s)
    for r in rows:  # an unreadable image shows as a placeholder, not a broken link
        for k in ("_thumb", "_orig"):
            if r.data.get(k) and thumbs.info(r.data[k]) is None:
                r.data[k] = None

    parts = [
        ("summary", "Counts and failures", _summary_html(by_subset, metas, rows)),
        ("contact-sheets", "Contact sheets", _sheets_html(sheets, by_subset, thumbs)),
        ("duplicates", "Duplicate clusters", _dups_html(clusters, thumbs, metas)),
        ("crops", "Crop boxes", _crops_html(cropped, rows, thumbs)),
        ("tags", "Top tags per subset", _tags_html(by_subset)),
        ("overfit", "Tags that will overfit", judgement.overfit_html(paths, metas)),
        ("aesthetic", "Aesthetic scores", judgement.aesthetic_html(by_subset, _bars)),
        ("aspect", "Aspect ratios and buckets", _aspect_html(by_subset, buckets)),
        ("captions", "Caption examples", _captions_html(captions, thumbs)),
    ]
    s.sections = [p[0] for p in parts]
    title = title or "curate report: " + ", ".join(m["name"] for m in metas)
    page = _page(title, parts, metas).replace(FILES, quote(thumbs.folder.name) + "/")
    tmp = out.with_name(out.name + ".part")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)  # (a full disk: no half page left behind)
        except OSError:
            pass
        raise CurateError(f"cannot write {out}: {exc.strerror or exc}") from None
    return s


def _buckets(config):
    from curate.common.buckets import Buckets

    res, lo, hi, step = RECIPE_BUCKETS
    if config is not None:
        from curate.common import train_config

        cfg = train_config.load(config)
        return Buckets(cfg.max_reso, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps, cfg.bucket_no_upscale)
    return Buckets((res, res), lo, hi, step)


def _by_subset(rows: list[Row], metas: list[dict]) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = defaultdict(list)
    many = len(metas) > 1
    for r in rows:
        name = r.data["subset"] or "(no subset)"
        out[f"{metas[r.m]['name']} / {name}" if many else name].append(r)
    return dict(out)


def _clusters(rows: list[Row]) -> list[tuple[Row | None, list[Row]]]:
    by_key = {r.data["key"]: r for r in rows}
    groups: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        if r.data["dup_of"]:
            groups[r.data["dup_of"]].append(r)
    return [(by_key.get(k), v) for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1]))]


def _size(r: Row) -> tuple[int, int] | None:
    """What training sees: the crop box's size when cropped, else the image's."""
    c = r.data["crop"]
    if c is not None:
        return c[2] - c[0], c[3] - c[1]
    w, h = r.data["width"], r.data["height"]
    return (w, h) if w and h else None


def _trimmed_share(r: Row) -> float:
    c, w, h = r.data["crop"], r.data["width"], r.data["height"]
    if c is None or not (w and h):
        return 0.0
    return 1 - (c[2] - c[0]) * (c[3] - c[1]) / (w * h)


# --- HTML pieces -------------------------------------------------------------------------

e = html.escape


def _img(name: str | None, alt: str, cls: str = "") -> str:
    if not name:
        return f'<div class="noimg {cls}">{e(alt)}<br>(no image)</div>'
    return f'<img class="{cls}" src="{FILES}{name}" loading="lazy" alt="{e(alt)}" title="{e(alt)}">'


def _bars(counts: list[tuple[str, int]], total: int | None = None) -> str:
    if not counts:
        return '<p class="empty">nothing to show</p>'
    top = max(n for _, n in counts) or 1
    out = ['<div class="bars">']
    for label, n in counts:
        share = f" ({100 * n / total:.0f}%)" if total else ""
        out.append(f'<div class="bar"><span class="label">{e(label)}</span><span class="track">'
                   f'<span class="fill" style="width:{100 * n / top:.1f}%"></span></span>'
                   f'<span class="n">{n}{share}</span></div>')
    out.append("</div>")
    return "".join(out)


def _summary_html(by_subset, metas, rows) -> str:
    head = "<tr><th>subset</th><th>rows</th><th>usable</th><th>duplicates</th><th>failed</th>" \
           "<th>on disk</th><th>cropped</th><th>tagged</th><th>captioned</th></tr>"
    body = []
    for name, rs in by_subset.items():
        d = [r.data for r in rs]
        cells = [len(d), sum(r.usable for r in rs), sum(bool(x["dup_of"]) for x in d), sum(bool(x["error"]) for x in d),
                 sum(bool(x["path"]) for x in d), sum(x["crop"] is not None for x in d),
                 sum(x["tagger"] is not None for x in d), sum(bool(x["caption"]) for x in d)]
        body.append(f"<tr><td>{e(name)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out = [f'<table class="counts">{head}{"".join(body)}</table>', "<h3>Failures by reason</h3>"]
    fails = Counter((metas[r.m]["name"], reason_of(r.data["error"])) for r in rows if r.data["error"])
    if fails:
        out.append(_bars([(f"{m}: {reason}", n) for (m, reason), n in fails.most_common()]))
        examples = [r for r in rows if r.data["error"]][:10]
        out.append('<ul class="errors">' + "".join(
            f"<li><code>{e(r.data['key'])}</code> {e(r.data['error'])}</li>" for r in examples) + "</ul>")
    else:
        out.append('<p class="empty">no failures</p>')
    out.append("<h3>Provenance</h3><ul>")
    for m in metas:
        stages = ", ".join(m.get("stages", {})) or "none"
        out.append(f"<li><b>{e(m['name'])}</b> <code>{e(m['path'])}</code>: {e(str(m.get('kind') or 'local'))} from "
                   f"{e(str(m.get('source', '?')))}, created {e(str(m.get('created', '?')))}"
                   + (f", class token <code>{e(str(m['class_token']))}</code>" if m.get("class_token") else "")
                   + f"; stages run: {e(stages)}</li>")
    out.append("</ul>")
    return "".join(out)


def _sheets_html(sheets, by_subset, thumbs) -> str:
    out = []
    for name, rs in sheets.items():
        total = sum(r.usable for r in by_subset[name])
        more = f" (first {len(rs)} of {total})" if len(rs) < total else ""
        out.append(f'<h3>{e(name)}: {total} usable images{more}</h3>')
        if not rs:
            out.append('<p class="empty">no images on disk (run curate download or ingest)</p>')
            continue
        out.append('<div class="sheet">')
        for r in rs:
            size = _size(r)
            label = f"{r.data['key']}  {size[0]}x{size[1]}" if size else r.data["key"]
            out.append(f"<figure>{_img(r.data.get('_thumb'), label)}<figcaption>{e(_short(r.data['key']))}"
                       f"</figcaption></figure>")
        out.append("</div>")
    return "".join(out) or '<p class="empty">no usable images</p>'


def _dups_html(clusters, thumbs, metas) -> str:
    if not clusters:
        return '<p class="empty">no duplicates marked (run curate dedupe)</p>'
    n_dups = sum(len(d) for _, d in clusters)
    out = [f"<p>{len(clusters)} clusters, {n_dups} rows marked as duplicates. The keeper (the best copy for "
           f"training: most content pixels inside borders, then colour, lossless, higher quality, an original) is "
           f"outlined green with what decided; the others are left out of training.</p>", '<div class="clusters">']
    for keeper, dups in clusters[:300]:
        out.append('<div class="cluster">')
        reason = next((r.data.get("keeper_reason") for r in ([keeper] if keeper else []) + dups
                       if r.data.get("keeper_reason")), None)
        why = f'<br><span class="why">kept for: {e(reason)}</span>' if reason else ""
        if keeper is not None:
            where = f" ({metas[keeper.m]['name']})"
            out.append(f'<figure class="keeper">{_img(keeper.data.get("_orig"), keeper.data["key"])}'
                       f'<figcaption><b>KEEP</b> {e(_short(keeper.data["key"]))}{e(where)}<br>{e(_name(keeper))}{why}'
                       f'{judgement.copy_facts(keeper.data)}'
                       f'</figcaption></figure>')
        else:
            out.append(f'<figure class="keeper"><div class="noimg">keeper {e(dups[0].data["dup_of"])}<br>'
                       f'is in a manifest not in this report</div><figcaption><b>KEEP</b>{why}</figcaption></figure>')
        for r in dups:
            out.append(f'<figure class="dup">{_img(r.data.get("_orig"), r.data["key"])}'
                       f'<figcaption>duplicate {e(_short(r.data["key"]))}<br>{e(_name(r))}'
                       f'{judgement.copy_facts(r.data)}</figcaption></figure>')
        out.append("</div>")
    out.append("</div>")
    if len(clusters) > 300:
        out.append(f"<p>... {len(clusters) - 300} more clusters</p>")
    return "".join(out)


def _crops_html(cropped, rows, thumbs) -> str:
    total = sum(r.data["crop"] is not None for r in rows)
    if not cropped:
        return (f'<p class="empty">{total} rows cropped, none trimmed' if total else
                '<p class="empty">no crops recorded (run curate crop)') + "</p>"
    trimmed = sum(_trimmed_share(r) > 0 for r in rows)
    out = [f"<p>{total} rows cropped, {trimmed} of them trimmed (the rest only downscaled). The box (what is "
           f"kept) is drawn on the original, most trimmed first{f' (first {len(cropped)})' if len(cropped) < trimmed else ''}."
           '</p><div class="sheet crops">']
    for r in cropped:
        info = thumbs.info(r.data.get("_orig"))
        c = r.data["crop"]
        if info is None or not info["w"]:
            out.append(f"<figure>{_img(None, r.data['key'])}</figure>")
            continue
        w, h = info["w"], info["h"]
        box = (f"left:{100 * c[0] / w:.2f}%;top:{100 * c[1] / h:.2f}%;"
               f"width:{100 * (c[2] - c[0]) / w:.2f}%;height:{100 * (c[3] - c[1]) / h:.2f}%")
        out.append(f'<figure><div class="cropwrap">{_img(r.data["_orig"], r.data["key"])}<div class="box" style="{box}">'
                   f'</div></div><figcaption>{e(_name(r))}<br>{w}x{h} &rarr; {c[2] - c[0]}x{c[3] - c[1]}</figcaption></figure>')
    out.append("</div>")
    return "".join(out)


def _tags_html(by_subset) -> str:
    out = []
    for name, rs in by_subset.items():
        counts: Counter = Counter()
        used = [r for r in rs if r.kept]
        for r in used:
            d = r.data
            tags = set(d.get("tags_general") or []) | set(d.get("tags_character") or [])
            tags |= {t["tag"] for t in d.get("tagger") or [] if t.get("category") != "rating"}
            counts.update(tags)
        out.append(f'<div class="chart"><h3>{e(name)}</h3>{_bars(counts.most_common(20), len(used))}</div>')
    return '<div class="charts">' + "".join(out) + "</div>"


def _aspect_html(by_subset, buckets) -> str:
    out = []
    for name, rs in by_subset.items():
        sizes = [s for s in (_size(r) for r in rs if r.kept) if s]
        aspect = Counter()
        bucket = Counter()
        for w, h in sizes:
            aspect[next(label for hi, label in ASPECT_BINS if w / h < hi)] += 1
            bw, bh = buckets.select_bucket(w, h)[0]
            bucket[f"{bw}x{bh}"] += 1
        ordered = [(label, aspect[label]) for _, label in ASPECT_BINS if aspect[label]]
        out.append(f'<div class="chart"><h3>{e(name)}: aspect ratio</h3>{_bars(ordered, len(sizes))}'
                   f'<h3>{e(name)}: buckets</h3>{_bars(bucket.most_common(12), len(sizes))}</div>')
    return '<div class="charts">' + "".join(out) + "</div>"


def _captions_html(captions, thumbs) -> str:
    out = []
    for name, rs in captions.items():
        if not rs:
            continue
        out.append(f"<h3>{e(name)}</h3>")
        for r in rs:
            out.append(f'<div class="caption">{_img(r.data.get("_thumb"), r.data["key"], "small")}'
                       f'<p><code>{e(_name(r))}</code><br>{e(r.data["caption"])}</p></div>')
    return "".join(out) or '<p class="empty">no captions yet (run curate caption)</p>'


def _short(key: str) -> str:
    return key.split("/", 1)[-1][:14]


def _name(r: Row) -> str:
    p = r.data["source_path"] or r.data["path"]
    return Path(p).name if p else r.data["key"]


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:12px 20px}header h1{margin:0;font-size:20px}
nav a{color:#b2dfdb;margin-right:14px}main{padding:0 20px 40px}
section{background:#fff;border:1px solid #ddd;border-radius:6px;margin:18px 0;padding:6px 16px 16px}
h2{border-bottom:1px solid #eee;padding-bottom:4px}h3{font-size:15px;margin:14px 0 6px}
table.counts{border-collapse:collapse}table.counts td,table.counts th{border:1px solid #ddd;padding:3px 9px;text-align:right}
table.counts td:first-child{text-align:left}
.sheet{display:flex;flex-wrap:wrap;gap:6px}figure{margin:0;text-align:center;font-size:11px;color:#555}
.sheet img{height:120px;min-width:40px;display:block;background:#eee}
.clusters{display:flex;flex-wrap:wrap;gap:10px}.cluster{display:flex;gap:8px;align-items:flex-start;border:1px solid #ddd;border-radius:4px;padding:8px}
.cluster img{height:110px;display:block}.keeper img,.keeper .noimg{outline:4px solid #2e7d32}
.dup img{outline:3px solid #c62828;opacity:.85}
.why{color:#2e7d32;font-style:italic}.facts{color:#666}
.cropwrap{position:relative;display:inline-block}.cropwrap img{height:150px;display:block}
.box{position:absolute;outline:2px solid #ff1744;outline-offset:-2px;box-shadow:0 0 0 2000px rgba(0,0,0,.45)}.crops figure{overflow:hidden}
.charts{display:flex;flex-wrap:wrap;gap:24px}.chart{min-width:340px;flex:1}
.bar{display:flex;align-items:center;gap:6px;margin:2px 0}.bar .label{width:150px;text-align:right;font-size:12px;overflow:hidden;white-space:nowrap;text-overflow:ellipsis}
.bar .track{flex:1;background:#eceff1;height:14px;border-radius:3px}.bar .fill{display:block;height:100%;background:#26a69a;border-radius:3px}
.bar .n{width:80px;font-size:12px}
.caption{display:flex;gap:10px;align-items:flex-start;margin:6px 0}.caption img.small{height:90px}
.noimg{display:inline-block;padding:10px;background:#eee;color:#777;font-size:11px;min-height:60px}
.empty{color:#888;font-style:italic}.errors{font-size:12px}
"""


def _page(title: str, parts, metas) -> str:
    nav = " ".join(f'<a href="#{sid}">{e(t)}</a>' for sid, t, _ in parts)
    body = "".join(f'<section id="{sid}"><h2>{e(t)}</h2>{content}</section>' for sid, t, content in parts)
    made = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f'<meta name="viewport" content="width=device-width"><style>{CSS}</style></head><body>'
            f'<header><h1>{e(title)}</h1><nav>{nav}</nav><small>made {made} by curate report from '
            f'{len(metas)} manifest(s)</small></header><main>{body}</main></body></html>')
