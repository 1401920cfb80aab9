"""curate.dataset.keeper: the order in which the facts settle a cluster's keeper."""

from curate.dataset import keeper


def test_choose_keeper_order_of_facts():
    base = dict(content_px=1000, file_px=1000, file_bytes=500, grey=False, lossless=True, jpeg_quality=None,
                derived=False, user_caption=None)

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
    assert pick({}, {"user_caption": "1girl, smile"}) == (1, "own caption")  # twins: the captioned one
    assert pick({"content_px": 1100}, {"user_caption": "1girl"}) == (0, "more content pixels")  # only a tie-break


# Public reports of the kind: bmaltais/kohya_ss#405 (datasets deduplicated by hand before
# training, captions kept beside the images) and LAION-AI/project-menu#11 ("dedup per
# url+caption not by url": the caption is part of what is kept). A person's sidecar caption
# is not dropped with a twin of its image that won on key order (found by make demo: a copy
# of a hand-captioned CG under a new name pushed the captioned original out).
def test_the_captioned_twin_is_kept(tmp_path):
    import pyarrow.parquet as pq

    from tests.dataset.test_dedupe import picture
    from tests.inproc import run_curate

    for captioned in ("a.png", "b.png"):
        d = tmp_path / captioned / "cg"
        d.mkdir(parents=True)
        picture(21).save(d / "a.png")
        (d / "b.png").write_bytes((d / "a.png").read_bytes())
        (d / captioned).with_suffix(".txt").write_text("1girl, holding flower\n")
        m = d.parent / "m.parquet"
        assert run_curate("ingest", d, "--out", m).returncode == 0
        r = run_curate("dedupe", m)
        assert r.returncode == 0, r.stderr
        rows = {row["source_path"].rsplit("/", 1)[-1]: row for row in pq.read_table(m).to_pylist()}
        kept = rows[captioned]
        assert kept["dup_of"] is None and kept["user_caption"] == "1girl, holding flower", captioned
        twin = {"a.png": "b.png", "b.png": "a.png"}[captioned]
        assert kept["keeper_reason"] == "own caption" and rows[twin]["dup_of"] == kept["key"]
