"""Which copy of a duplicate cluster is kept for training, and why (`keeper_reason`).

Used by curate.dataset.dedupe: the facts per row come from its hashing (content pixels inside
detected borders, greyscale, lossless, JPEG quality, bytes, derived copy); this module
only ranks them, so the order of preference lives in one place.
"""

from __future__ import annotations

CONTENT_TIE = 0.02   # content pixel counts this close are a tie (borders are found on a ~256 px copy)
# What settles a cluster's keeper, in this order (choose_keeper); the reason is the one that decided.
REASONS = ("more content pixels", "colour", "lossless", "higher quality", "original", "no bars", "key order",
           "other manifest",  # the one row of an --against manifest in the cluster
           "review")          # a person chose the keeper or split the cluster (curate review)


def choose_keeper(rows: list[int], facts: dict[str, list], keys: list[str]) -> tuple[int, str]:
    """The best copy among `rows` for training, and the REASONS entry that decided.

    Each step keeps the rows that are best by one fact (content pixels within
    CONTENT_TIE of the most count as a tie) and passes them on; the reason is the
    last step that left one row (or "key order" when several are alike to the end).
    `facts` holds per row: content_px, file_px, file_bytes, grey, lossless,
    jpeg_quality, derived.
    """
    f = facts

    def quality(r):  # lossy copies: JPEG quality when all are JPEGs, then bytes per content pixel
        if f["lossless"][r]:
            return 0, 0.0  # a PNG's size says how well it compressed, not how good it is
        q = f["jpeg_quality"][r] if all(f["jpeg_quality"][x] is not None for x in cands) else 0
        return q, (f["file_bytes"][r] or 0) / max(1, f["content_px"][r] or 0)

    steps = [
        ("more content pixels", lambda r: f["content_px"][r] or 0, CONTENT_TIE),
        ("colour", lambda r: not f["grey"][r], 0),
        ("lossless", lambda r: bool(f["lossless"][r]), 0),
        ("higher quality", quality, 0),
        ("original", lambda r: not f["derived"][r], 0),
        ("no bars", lambda r: (f["content_px"][r] or 0) / max(1, f["file_px"][r] or 0), CONTENT_TIE),
    ]
    cands = list(rows)
    for reason, key, tie in steps:
        if len(cands) < 2:
            break
        values = {r: key(r) for r in cands}
        best = max(values.values())
        cands = [r for r in cands if (values[r] >= best * (1 - tie) if tie else values[r] == best)]
        if len(cands) == 1:
            return cands[0], reason
    return min(cands, key=lambda r: keys[r]), "key order"
