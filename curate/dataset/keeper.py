"""Which copy of a duplicate cluster is kept for training, and why (`keeper_reason`).

Used by curate.dataset.dedupe: the facts per row come from its hashing (content pixels inside
detected borders, greyscale, lossless, JPEG quality, bytes, derived copy); this module
only ranks them, so the order of preference lives in one place.
"""

from __future__ import annotations

CONTENT_TIE = 0.02   # content pixel counts this close are a tie (borders are found on a ~256 px copy)
SHARP_TIE = 0.33     # sharpness this close is a tie: blur costs 3x and more, a subtitle line ~13%
                     # (curate.dataset.sharpness)
# What settles a cluster's keeper, in this order (choose_keeper); the reason is the one that decided.
REASONS = ("more content pixels", "upscaled copy", "colour", "lossless", "higher quality", "sharper", "original", "no bars",
           "own caption",  # the copy a person captioned (a sidecar read at ingest) over its twins
           "key order",
           "other manifest",  # the one row of an --against manifest in the cluster
           "review")          # a person chose the keeper or split the cluster (curate review)


def choose_keeper(rows: list[int], facts: dict[str, list], keys: list[str]) -> tuple[int, str]:
    """The best copy among `rows` for training, and the REASONS entry that decided.

    Each step keeps the rows that are best by one fact (content pixels within
    CONTENT_TIE of the most count as a tie) and passes them on; the reason is the
    last step that left one row (or "key order" when several are alike to the end).
    `facts` holds per row: content_px, file_px, file_bytes, grey, lossless,
    jpeg_quality, derived; optional: effective_px (the resolution the picture was drawn at,
    curate.dataset.sharpness), sharpness, user_caption (a person's caption: among copies
    alike in everything else, theirs is kept rather than lost with its twin).
    Content pixels count at the effective resolution, and among copies alike in that the
    least enlarged wins: when that passes over a copy with more pixels (an upscale), the
    reason is "upscaled copy", whatever settles the rest.
    """
    f = facts
    eff = f.get("effective_px") or [None] * (max(rows) + 1)
    sharp = f.get("sharpness") or [None] * (max(rows) + 1)
    captioned = f.get("user_caption") or [None] * (max(rows) + 1)

    def content(r, effective=True):
        px = f["content_px"][r] or 0
        if effective and eff[r] and f["file_px"][r]:
            px *= min(1.0, eff[r] / f["file_px"][r])
        return px

    def quality(r):  # lossy copies: JPEG quality when all are JPEGs, then bytes per content pixel
        if f["lossless"][r]:
            return 0, 0.0  # a PNG's size says how well it compressed, not how good it is
        q = f["jpeg_quality"][r] if all(f["jpeg_quality"][x] is not None for x in cands) else 0
        return q, (f["file_bytes"][r] or 0) / max(1, f["content_px"][r] or 0)

    steps = [
        ("more content pixels", content, CONTENT_TIE),
        ("upscaled copy", lambda r: min(1.0, (eff[r] or f["file_px"][r] or 1) / (f["file_px"][r] or 1)),
         CONTENT_TIE),
        ("colour", lambda r: not f["grey"][r], 0),
        ("lossless", lambda r: bool(f["lossless"][r]), 0),
        ("higher quality", quality, 0),
        ("sharper", lambda r: sharp[r] or 0.0, SHARP_TIE),
        ("original", lambda r: not f["derived"][r], 0),
        ("no bars", lambda r: (f["content_px"][r] or 0) / max(1, f["file_px"][r] or 0), CONTENT_TIE),
        ("own caption", lambda r: bool(captioned[r]), 0),
    ]
    cands = list(rows)
    upscaled = False
    for reason, key, tie in steps:
        if len(cands) < 2:
            break
        values = {r: key(r) for r in cands}
        best = max(values.values())
        kept = [r for r in cands if (values[r] >= best * (1 - tie) if tie else values[r] == best)]
        if reason in ("more content pixels", "upscaled copy"):  # a copy with more pixels passed over?
            raw = max(content(r, False) for r in kept)
            upscaled |= any(content(r, False) > raw * (1 + tie) for r in cands if r not in kept)
        cands = kept
        if len(cands) == 1:
            return cands[0], "upscaled copy" if upscaled else reason
    return min(cands, key=lambda r: keys[r]), "upscaled copy" if upscaled else "key order"
