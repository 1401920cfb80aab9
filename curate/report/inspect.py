"""`curate inspect`: what a manifest holds, for people and scripts."""

from __future__ import annotations

from collections import Counter

import pyarrow.compute as pc

from curate import manifest
from curate.common import decisions
from curate.common.overfit import RATIO

# stage -> the column that stage fills
STAGE_COLUMNS = {"download/ingest": "path", "dedupe": "phash", "crop": "crop", "tag": "tagger", "caption": "caption"}


def inspect(path) -> dict:
    table, meta = manifest.read(path)
    subsets = Counter(s if s is not None else "(no subset)" for s in table.column("subset").to_pylist())
    errors = [e for e in table.column("error").to_pylist() if e]
    filled = {stage: table.num_rows - table.column(col).null_count for stage, col in STAGE_COLUMNS.items()}
    dups = table.num_rows - table.column("dup_of").null_count
    usable = pc.sum(pc.and_(pc.is_null(table.column("error")), pc.is_null(table.column("dup_of")))).as_py() or 0
    return {
        "path": str(path),
        "rows": table.num_rows,
        "usable": usable,
        "subsets": dict(subsets),
        "stages_filled": filled,
        "stages_run": sorted((meta.get("stages") or {}).keys()),
        "duplicates": dups,
        # download from a re-encoded archive: the file is not the post's original (md5 differs)
        "derivatives": dict(Counter(d for d in table.column("derivative").to_pylist() if d))
        if "derivative" in table.column_names else {},
        "failures": dict(Counter(reason_of(e) for e in errors).most_common()),
        "review": decisions.current(path).counts(table.column("key").to_pylist()),
        "provenance": {k: v for k, v in meta.items() if k != "query_text"},
    }


def reason_of(error: str) -> str:
    """`http 404` and `decode: broken data stream` group as `http 404`, `decode`."""
    return error.split(":", 1)[0].strip()


def render(info: dict) -> str:
    prov = info["provenance"]
    lines = [
        f"{info['path']}: {info['rows']} rows, {info['usable']} usable (no error, not a duplicate)",
        f"  made by: curate {prov.get('version', '?')} {prov.get('kind', '')} from {prov.get('source', '?')} "
        f"at {prov.get('created', '?')}" + (f", seed {prov['seed']}" if prov.get("seed") is not None else ""),
    ]
    if prov.get("class_token"):
        lines.append(f"  class token: {prov['class_token']}")
    if isinstance(prov.get("rating_scale"), dict):  # which rating scale the source was read on
        rs = prov["rating_scale"]
        files = ", ".join(f"{k} {v}" for k, v in sorted((rs.get("files") or {}).items()))
        lines.append(f"  rating scale: {rs.get('applied')} (--rating-scale {rs.get('option')}"
                     + (f"; files: {files}" if files else "") + ")")
    quotas = prov.get("subsets") or {}
    lines.append("  subsets:")
    for name, n in info["subsets"].items():
        q = quotas.get(name, {})
        extra = f" (quota {q['quota']}, eligible {q['eligible']})" if q.get("quota") is not None else ""
        lines.append(f"    {name:<24} {n:>8}{extra}")
    lines.append("  stages (rows filled): " + ", ".join(f"{k} {v}" for k, v in info["stages_filled"].items()))
    lines.append(f"  stages run: {', '.join(info['stages_run']) or 'none'}; duplicates marked: {info['duplicates']}")
    for kind, n in info["derivatives"].items():
        lines.append(f"  derivatives: {n} files are re-encoded copies from an {kind} (md5 is the post's, "
                     f"file_sha256 the stored file's)")
    if info["failures"]:
        lines.append("  failures: " + ", ".join(f"{k} {v}" for k, v in info["failures"].items()))
    else:
        lines.append("  failures: none")
    r = info["review"]
    lines.append(f"  review: {r['looked_at']} looked at, {r['dropped']} dropped, {r['edited']} edited by a person")
    return "\n".join(lines)


def render_tags(path, info: dict) -> str:
    """`curate inspect --tags`: the over-represented tags and what they mean for the run."""
    if info["base"] is None:
        return f"{path}: {info['rows']} usable rows; {info['note']}"
    lines = [f"{path}: {info['rows']} usable rows; tags on >= {RATIO:g}x their share in {info['base']}"
             + (f"; reg set {info['reg_rows']} rows" if info.get("reg_rows") is not None else "")]
    if not info["flagged"]:
        lines.append("  none: no tag is over-represented")
    for d in info["flagged"]:
        cap = "" if d["caption_share"] is None else f", captions {d['caption_share']:.0%}"
        reg = "" if d["reg_share"] is None else f", reg {d['reg_share']:.1%}"
        lines.append(f"  {d['tag']:<28} {d['share']:>5.0%} of rows vs {d['base']:.2%} ({d['ratio']:.0f}x){cap}{reg}")
        lines.append(f"  {'':<28} -> {d['meaning']}")
    return "\n".join(lines)
