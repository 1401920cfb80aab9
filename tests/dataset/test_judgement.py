"""Judgement in dedupe (issue 27): mirrored copies, upscaled copies, the sharpest frame.

Real images drawn here, through the real CLI; the measures themselves in
test_sharpness.py.
"""

import shutil

import imagehash
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter, ImageOps

from curate.dataset import dedupe
from tests.dataset.test_dedupe import picture, rows_by_name
from tests.inproc import run_curate as curate  # the commands in this process


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    d = tmp_path_factory.mktemp("judge") / "cg"
    d.mkdir()
    a = picture(11)
    a.save(d / "a.png")
    ImageOps.mirror(a).save(d / "a_mirrored.jpg", quality=92)          # a flipped repost
    b = picture(12, 512, 288)
    b.save(d / "b_original.png")
    b.resize((1024, 576), Image.Resampling.BICUBIC).save(d / "b_upscaled.jpg", quality=92)  # 4x the pixels
    c = picture(13)
    c.save(d / "c_sharp.png")                                          # video frames, one size, lossless
    c.filter(ImageFilter.GaussianBlur(1.5)).save(d / "c_blur.png")
    c.filter(ImageFilter.BoxBlur(3)).save(d / "c_motion.png")
    big = picture(14, 1024, 576)                                       # drawn big: a genuine "1-up"
    big.save(d / "d_big.png")
    big.resize((512, 288), Image.Resampling.LANCZOS).save(d / "d_small.jpg", quality=90)
    m = d.parent / "m.parquet"
    assert curate("ingest", d, "--out", m).returncode == 0
    kept_apart = d.parent / "apart.parquet"
    shutil.copy(m, kept_apart)
    r = curate("dedupe", m)
    assert r.returncode == 0, r.stderr
    r2 = curate("dedupe", kept_apart, "--keep-mirrors")
    assert r2.returncode == 0, r2.stderr
    return m, r.stdout, kept_apart, r2.stdout


# Public reports of the same input: cloud-py-api/mediadc#199 "Detect mirrored duplicates"
# and stashapp/stash#2861 (a flipped copy is not found: "the distance between the
# non-flipped version and flipped version is just too great" for phash).
def test_a_flipped_copy_is_caught_and_counted(judged):
    m, out, _, _ = judged
    rows = rows_by_name(m)
    assert rows["a.png"]["dup_of"] is None
    assert rows["a_mirrored.jpg"]["dup_of"] == rows["a.png"]["key"]
    assert rows["a_mirrored.jpg"]["dup_reason"] == "mirrored copy"
    assert rows["a.png"]["keeper_reason"] == "lossless"
    assert "mirrored copies: 1 marked" in out
    # the direct hashes are far apart: only the mirrored hash found it
    ph, phm = (dedupe.from_hex(rows["a.png"][c]) for c in ("phash", "phash_mirror"))
    other = dedupe.from_hex(rows["a_mirrored.jpg"]["phash"])
    assert dedupe.hamming([ph], [other])[0] > 20 and dedupe.hamming([phm], [other])[0] <= 4


def test_keep_mirrors_keeps_them_apart(judged):
    _, _, apart, out = judged
    rows = rows_by_name(apart)
    assert rows["a_mirrored.jpg"]["dup_of"] is None and rows["a.png"]["dup_of"] is None
    assert "kept apart (--keep-mirrors)" in out
    assert rows["b_upscaled.jpg"]["dup_of"] == rows["b_original.png"]["key"]  # the rest as usual
    assert pq.read_metadata(apart).metadata is not None


def test_an_upscaled_copy_loses_to_its_smaller_original(judged):
    rows = rows_by_name(judged[0])
    orig, up = rows["b_original.png"], rows["b_upscaled.jpg"]
    assert up["content_px"] == 4 * orig["content_px"]  # "more content pixels" would have kept the upscale
    assert orig["dup_of"] is None and up["dup_of"] == orig["key"]
    assert orig["keeper_reason"] == up["keeper_reason"] == "upscaled copy"
    assert up["effective_px"] <= orig["effective_px"] == 512 * 288


def test_the_sharp_frame_is_kept_among_blurred_ones(judged):
    rows = rows_by_name(judged[0])
    sharp, blur, motion = rows["c_sharp.png"], rows["c_blur.png"], rows["c_motion.png"]
    assert sharp["dup_of"] is None and blur["dup_of"] == motion["dup_of"] == sharp["key"]
    assert sharp["keeper_reason"] == "sharper"
    assert sharp["sharpness"] > 3 * max(blur["sharpness"], motion["sharpness"])


def test_mirrored_hashes_are_the_hashes_of_the_flipped_picture():
    """Derived from the same DCT (no second decode), they equal imagehash on the flipped image."""
    for seed in range(4):
        im = picture(seed, 400 + 37 * seed, 300)
        h = dedupe.image_hashes(im)
        flipped = dedupe.image_hashes(ImageOps.mirror(im))
        assert h["phash"] == dedupe._bits(imagehash.phash(im))  # still imagehash's phash, bit for bit
        assert h["dhash"] == dedupe._bits(imagehash.dhash(im))
        assert h["phash_mirror"] == flipped["phash"]
        assert dedupe.hamming([h["dhash_mirror"]], [flipped["dhash"]])[0] <= 2  # ties may differ
        assert np.isclose(h["sharpness"], flipped["sharpness"], rtol=0.2)  # a tie for the keeper (SHARP_TIE)


def test_choose_keeper_effective_pixels_and_sharpness():
    from curate.dataset.keeper import choose_keeper

    base = dict(content_px=1000, file_px=1000, file_bytes=500, grey=False, lossless=True, jpeg_quality=None,
                derived=False, effective_px=None, sharpness=1.0)

    def pick(*rows):
        facts = {c: [r.get(c, base[c]) for r in rows] for c in base}
        return choose_keeper(list(range(len(rows))), facts, [f"k{i}" for i in range(len(rows))])

    up = {"content_px": 4000, "file_px": 4000, "effective_px": 1000, "lossless": False, "jpeg_quality": 95}
    assert pick(up, {"effective_px": 1000}) == (1, "upscaled copy")
    assert pick({"content_px": 4000, "file_px": 4000, "effective_px": 2500}, {}) == (0, "more content pixels")
    assert pick({"sharpness": 0.2}, {}) == (1, "sharper")
    assert pick({"sharpness": 0.9}, {}) == (0, "key order")  # within SHARP_TIE: a tie
    assert pick({"sharpness": None}, {"sharpness": None}) == (0, "key order")


def test_pairs_across_finds_every_pair_within_the_threshold():
    from curate.dataset.hamming_index import hamming, pairs_across

    rng = np.random.default_rng(0)
    a = rng.integers(-(2**63), 2**63 - 1, 3000, dtype=np.int64)
    b = a ^ (1 << rng.integers(0, 63, 3000)).astype(np.int64)  # each b[i] one bit from a[i]
    b[:100] = rng.integers(-(2**63), 2**63 - 1, 100, dtype=np.int64)
    i, j = pairs_across(a, b, 6)
    brute = {(x, y) for x in range(300) for y in range(300) if hamming([a[x]], [b[y]])[0] <= 6}
    assert brute == {(x, y) for x, y in zip(i.tolist(), j.tolist()) if x < 300 and y < 300}
    assert {(x, x) for x in range(100, 3000)} <= set(zip(i.tolist(), j.tolist()))


# Public report: danbooru/danbooru#5464 "uploads: don't label 1-ups as duplicates": a
# genuinely higher-resolution version is the better copy; the upscale check must not
# take it for an upscale of its own downscale.
def test_a_genuine_higher_resolution_copy_still_wins(judged):
    rows = rows_by_name(judged[0])
    big, small = rows["d_big.png"], rows["d_small.jpg"]
    assert big["dup_of"] is None and small["dup_of"] == big["key"]
    assert big["keeper_reason"] == "more content pixels"
    assert big["effective_px"] == 1024 * 576
