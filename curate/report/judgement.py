"""The report's judgement sections (issue 27): tags that will overfit, the aesthetic score
histogram, and the per-copy facts shown under each duplicate (how it matched, sharpness,
effective resolution, score)."""

from __future__ import annotations

import html
from pathlib import Path

from curate.common import overfit
from curate.errors import CurateError

COLUMNS = ["dup_reason", "sharpness", "effective_px", "width", "height", "aesthetic"]
BINS = 10  # aesthetic histogram bars


def e(s) -> str:
    return html.escape(str(s), quote=True)


def copy_facts(d: dict) -> str:
    """One line under a duplicate or keeper: how it matched, sharpness, resolution drawn at."""
    parts = []
    if d.get("dup_reason"):
        parts.append(d["dup_reason"])
    if d.get("sharpness") is not None:
        parts.append(f"sharpness {d['sharpness']:.2f}")
    px, w, h = d.get("effective_px"), d.get("width"), d.get("height")
    if px and w and h and px < 0.9 * w * h:
        parts.append(f"drawn at ~{(px / (w * h)) ** 0.5 * w:.0f}px wide (upscaled)")
    if d.get("aesthetic") is not None:
        parts.append(f"aesthetic {d['aesthetic']:.2f}")
    return f'<br><span class="facts">{e(", ".join(parts))}</span>' if parts else ""


def overfit_html(paths: list[Path], metas: list[dict]) -> str:
    """Per training manifest: the over-represented tags against Danbooru (the tagger's
    selected_tags.csv) or else the first reg manifest of the report."""
    reg = next((Path(m["path"]) for m in metas if m.get("kind") == "reg"), None)
    out = []
    for p, m in zip(paths, metas):
        if m.get("kind") == "reg":
            continue
        try:
            info = overfit.report(p, reg=reg)
        except CurateError as exc:
            out.append(f'<p class="empty">{e(m["name"])}: {e(exc)}</p>')
            continue
        if info["base"] is None:
            out.append(f'<p class="empty">{e(m["name"])}: {e(info["note"])}</p>')
            continue
        head = (f"<h3>{e(m['name'])}</h3><p>{info['rows']} usable rows against {e(info['base'])}: tags on "
                f"&ge;{overfit.RATIO:g}x their base share. Unless captioned and balanced by the reg set "
                f"they are baked into the style.</p>")
        if not info["flagged"]:
            out.append(head + '<p class="empty">no tag is over-represented</p>')
            continue
        rows = "".join(
            f"<tr><td>{e(d['tag'])}</td><td>{d['share']:.0%}</td><td>{d['base']:.2%}</td><td>{d['ratio']:.0f}x</td>"
            f"<td>{'' if d['caption_share'] is None else format(d['caption_share'], '.0%')}</td>"
            f"<td>{'' if d['reg_share'] is None else format(d['reg_share'], '.1%')}</td><td>{e(d['meaning'])}</td></tr>"
            for d in info["flagged"][:60])
        out.append(head + '<table class="counts overfit"><tr><th>tag</th><th>training</th><th>base</th><th>ratio</th>'
                   f'<th>captions</th><th>reg</th><th>what it means</th></tr>{rows}</table>')
    return "".join(out) or '<p class="empty">no training manifest in this report</p>'


def aesthetic_html(by_subset: dict, bars) -> str:
    """Histogram of the `aesthetic` column (curate score) per subset, kept rows."""
    out = []
    for name, rs in by_subset.items():
        vals = [r.data.get("aesthetic") for r in rs if r.kept and r.data.get("aesthetic") is not None]
        if not vals:
            continue
        lo, hi = min(vals), max(vals)
        step = (hi - lo) / BINS or 1.0
        counts = [0] * BINS
        for v in vals:
            counts[min(BINS - 1, int((v - lo) / step))] += 1
        labels = [f"{lo + k * step:.2f} .. {lo + (k + 1) * step:.2f}" for k in range(BINS)]
        out.append(f'<div class="chart"><h3>{e(name)} ({len(vals)} scored, median '
                   f'{sorted(vals)[len(vals) // 2]:.2f})</h3>{bars(list(zip(labels, counts)), len(vals))}</div>')
    if not out:
        return '<p class="empty">no scores (run curate score)</p>'
    return '<div class="charts">' + "".join(out) + "</div>"
