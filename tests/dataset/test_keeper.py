"""curate.dataset.keeper: the order in which the facts settle a cluster's keeper."""

from curate.dataset import keeper


def test_choose_keeper_order_of_facts():
    base = dict(content_px=1000, file_px=1000, file_bytes=500, grey=False, lossless=True, jpeg_quality=None,
                derived=False)

    def pick(*rows):
        facts = {c: [r.get(c, base[c]) for r in rows] for c in base}
        k, why = keeper.choose_keeper(list(range(len(rows))), facts, [f"k{i}" for i in range(len(rows))])
        return k, why

    assert pick({"content_px": 900}, {}) == (1, "more content pixels")
    assert pick({"content_px": 990, "grey": True}, {}) == (1, "colour")  # within 2%: a tie on pixels
    assert pick({"lossless": False, "jpeg_quality": 98, "content_px": 1010}, {}) == (1, "lossless")
    lossy = {"lossless": False, "jpeg_quality": 80}
    assert pick(lossy, {**lossy, "jpeg_quality": 90}) == (1, "higher quality")
    assert pick(lossy, {**lossy, "file_bytes": 700}) == (1, "higher quality")  # same tables, more bytes
    assert pick({**lossy, "jpeg_quality": None, "file_bytes": 300}, {**lossy, "jpeg_quality": None}) == (1, "higher quality")
    assert pick({"derived": True}, {}) == (1, "original")
    assert pick({"file_px": 1400}, {}) == (1, "no bars")
    assert pick({}, {}) == (0, "key order")
