"""`curate dedupe`: the real CLI on real files (the index: test_hamming_index, the keeper: test_keeper)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from curate.dataset import dedupe
from curate.dataset.keeper import REASONS
from tests.inproc import in_new_process as curate  # the command in a new interpreter
from tests.inproc import run_curate as run  # the stage in this process


def picture(seed: int, w: int = 640, h: int = 360) -> Image.Image:
    """A flat-shaded scene: gradient sky, ground, outlined shapes (CG-like)."""
    rng = np.random.default_rng(seed)
    col = lambda: tuple(int(c) for c in rng.integers(0, 256, 3))  # noqa: E731
    top, bottom = np.array(col()), np.array(col())
    t = np.linspace(0, 1, h)[:, None, None]
    im = Image.fromarray((top * (1 - t) + bottom * t).repeat(w, axis=1).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.rectangle([0, int(h * rng.uniform(0.5, 0.8)), w, h], fill=col())
    for _ in range(10):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.05, 0.25) * min(w, h)
        d.ellipse([x - r, y - r, x + r, y + r], fill=col(), outline=(10, 10, 10), width=3)
    return im


def letterbox(im: Image.Image, bar: int, colour=(0, 0, 0)) -> Image.Image:
    out = Image.new("RGB", (im.width, im.height + 2 * bar), colour)
    out.paste(im, (0, bar))
    return out


# --- the stage, through the CLI ------------------------------------------------------


@pytest.fixture(scope="module")
def cg(tmp_path_factory):
    """A CG folder: one scene in many encodings/edits, look-alikes, and odd files."""
    d = tmp_path_factory.mktemp("dedupe") / "cg"
    d.mkdir()
    base = picture(1)
    base.save(d / "base.png")
    (d / "base_copy.png").write_bytes((d / "base.png").read_bytes())       # same bytes
    base.save(d / "base.bmp")                                                # same pixels
    base.save(d / "base_q70.jpg", quality=70)                                # re-encode
    base.resize((960, 540), Image.Resampling.LANCZOS).save(d / "base_big.png")  # most pixels
    base.resize((320, 180)).save(d / "base_small.jpg", quality=85)
    letterbox(base, 140).save(d / "base_letterbox.jpg", quality=90)          # 640x640 frame
    sub = base.copy()
    ImageDraw.Draw(sub).text((200, 320), "Sensei, over here!", fill=(255, 255, 255),
                             font=ImageFont.load_default(18), stroke_width=2, stroke_fill=(0, 0, 0))
    sub.save(d / "base_subtitle.png")
    ImageEnhance.Brightness(base).enhance(1.08).save(d / "base_bright.png")
    base.crop((12, 8, 628, 352)).save(d / "base_crop.png")                  # ~3% crop
    other = picture(2)
    other.save(d / "other.png")
    other.save(d / "other_q80.jpg", quality=80)
    picture(3).save(d / "third.png")
    picture(4).convert("L").save(d / "grey.png")
    rgba = picture(5).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "alpha.png")
    dark = Image.new("RGB", (640, 360), (0, 0, 0))
    ImageDraw.Draw(dark).ellipse([300, 160, 340, 200], fill=(255, 240, 200))
    dark.save(d / "dark.png")
    Image.new("RGB", (500, 300), (255, 255, 255)).save(d / "white.png")
    Image.new("RGB", (1, 1), (3, 4, 5)).save(d / "one.png")
    Image.new("RGB", (20000, 100), (10, 120, 30)).save(d / "strip.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 nope")
    return d


BASE_VARIANTS = ["base.png", "base_copy.png", "base.bmp", "base_q70.jpg", "base_small.jpg", "base_big.png",
                 "base_letterbox.jpg", "base_subtitle.png", "base_bright.png", "base_crop.png"]
# lossless at the original size, alike in sharpness (a subtitle, +8% brightness): one is kept, by key order
ORIGINALS = ("base.png", "base_copy.png", "base.bmp", "base_bright.png", "base_subtitle.png")


def base_keeper(rows) -> dict:
    """The kept copy of the base scene: an original, not base_big.png (a 1.5x upscale)."""
    kept = [rows[n] for n in ORIGINALS if rows[n]["dup_of"] is None]
    assert len(kept) == 1, [(n, rows[n]["dup_of"]) for n in ORIGINALS]
    return kept[0]
SINGLES = ["third.png", "grey.png", "alpha.png", "dark.png", "white.png", "one.png", "strip.png"]


def rows_by_name(path):
    return {Path(r["source_path"]).name: r for r in pq.read_table(path).to_pylist()}


@pytest.fixture(scope="module")
def deduped(cg):
    m = cg.parent / "m" / "cg.parquet"
    assert run("ingest", cg, "--out", m).returncode == 0
    r = run("dedupe", m)
    assert r.returncode == 0, r.stderr
    return m, r.stdout


def test_dedupe_marks_variants_and_keeps_the_original_over_its_upscale(deduped):
    m, out = deduped
    rows = rows_by_name(m)
    keeper = base_keeper(rows)
    for name in BASE_VARIANTS:
        assert rows[name]["dup_of"] in (None, keeper["key"]), name
    assert rows["base_big.png"]["dup_of"] == keeper["key"]
    assert keeper["keeper_reason"] == "upscaled copy"  # base_big.png has more pixels, not more picture
    assert rows["base_big.png"]["effective_px"] == keeper["effective_px"] == 640 * 360
    assert rows["other.png"]["dup_of"] is None
    assert rows["other_q80.jpg"]["dup_of"] == rows["other.png"]["key"]
    for name in SINGLES:
        assert rows[name]["dup_of"] is None, name
        assert rows[name]["phash"] is not None and rows[name]["error"] is None, name
    assert rows["broken.jpg"]["error"] and rows["broken.jpg"]["phash"] is None
    assert "1 same bytes" in out and "same pixels" in out
    assert f"{len(BASE_VARIANTS)} rows marked dup_of in 2 clusters" in out


def test_exact_pixels_found_even_at_threshold_zero(cg, tmp_path):
    m = tmp_path / "m.parquet"
    assert run("ingest", cg, "--out", m).returncode == 0
    r = run("dedupe", m, "--threshold", "0")
    assert r.returncode == 0, r.stderr
    assert "1 same bytes, 2 same pixels" in r.stdout  # the BMP holds base.png's pixels
    rows = rows_by_name(m)
    kept = {rows[n]["dup_of"] or rows[n]["key"] for n in ("base.png", "base_copy.png", "base.bmp")}
    assert len(kept) == 1
    assert rows["other.png"]["dup_of"] is None and rows["third.png"]["dup_of"] is None


def test_rerun_reuses_hashes_and_is_stable(deduped):
    m, _ = deduped
    before = pq.read_table(m).to_pylist()
    r = run("dedupe", m)
    assert r.returncode == 0 and " 0 hashed" in r.stdout
    assert pq.read_table(m).to_pylist() == before


def test_against_marks_rows_found_in_another_manifest(cg, tmp_path):
    reg = tmp_path / "reg"
    reg.mkdir()
    picture(2).resize((800, 450)).save(reg / "same_as_other.jpg", quality=88)
    picture(77).save(reg / "unrelated.png")
    reg_m = tmp_path / "reg.parquet"
    assert run("ingest", reg, "--out", reg_m).returncode == 0
    reg_bytes = reg_m.read_bytes()
    m = tmp_path / "cg.parquet"
    assert run("ingest", cg, "--out", m).returncode == 0
    r = run("dedupe", m, "--against", reg_m)
    assert r.returncode == 0, r.stderr
    assert "duplicate rows of --against" in r.stdout
    rows = rows_by_name(m)
    reg_key = rows_by_name(reg_m)["same_as_other.jpg"]["key"]
    assert rows["other.png"]["dup_of"] == reg_key
    assert rows["other_q80.jpg"]["dup_of"] == reg_key
    assert rows["base_q70.jpg"]["dup_of"] == base_keeper(rows)["key"]
    assert reg_m.read_bytes() == reg_bytes  # the other manifest is only read


def test_help_states_the_measured_default():
    r = run("dedupe", "--help")
    text = " ".join(r.stdout.replace("│", " ").split())  # rich draws a box around options
    assert r.returncode == 0 and f"default: {dedupe.DEFAULT_THRESHOLD}," in text


def test_bad_input_is_one_line_error(deduped, tmp_path):
    m, _ = deduped
    before = m.read_bytes()
    for args in (["--threshold", "99"], ["--against", tmp_path / "missing.parquet"], ["--against", m]):
        r = curate("dedupe", m, *args)
        assert r.returncode == 2, args
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert m.read_bytes() == before
    assert curate("dedupe", tmp_path / "nope.parquet").returncode == 2


def test_killed_worker_keeps_finished_hashes_and_a_rerun_finishes(cg, tmp_path):
    m = tmp_path / "cg.parquet"
    assert run("ingest", cg, "--out", m).returncode == 0
    env = {**os.environ, "CURATE_POOL_KILL": "12"}
    r = subprocess.run([sys.executable, "-m", "curate", "dedupe", m, "--workers", "2"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: hashing: a worker process was killed")
    hashed = sum(x["phash"] is not None for x in pq.read_table(m).to_pylist())
    assert 0 < hashed < 22
    r = curate("dedupe", m, "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert f"{hashed} hashes reused" in r.stdout
    rows = rows_by_name(m)
    assert rows["base_q70.jpg"]["dup_of"] == base_keeper(rows)["key"]


# --- the keeper: the best copy for training, and why ------------------------------------


def muted(seed: int, w: int = 640, h: int = 360) -> Image.Image:
    """A CG-like picture in soft colours (its greyscale copy still matches on mean colour)."""
    return ImageEnhance.Color(picture(seed, w, h)).enhance(0.35)


@pytest.fixture(scope="module")
def keepers(tmp_path_factory):
    """Pairs and trios where the most pixels or key order would keep the worse copy."""
    d = tmp_path_factory.mktemp("keepers") / "cg"
    d.mkdir()
    for n in range(1, 7):  # an original PNG and the same picture as JPEG q70, same size
        im = picture(100 + n)
        im.save(d / f"cg{n:02d}_original.png")
        im.save(d / f"cg{n:02d}_q70.jpg", quality=70)
    colour = muted(200)
    colour.save(d / "colour.png")
    colour.convert("L").save(d / "colour_grey.png")
    # a red-tinted CG: its mean colour is far from its greyscale copy's, which still is the same picture
    vivid = Image.blend(picture(201), Image.new("RGB", (640, 360), (230, 40, 60)), 0.45)
    vivid.save(d / "vivid.png")
    vivid.convert("L").save(d / "vivid_grey.jpg", quality=90)
    clean = picture(300, 800, 450)
    clean.save(d / "twin_clean.png")
    letterbox(clean.resize((720, 405), Image.Resampling.LANCZOS), 157).save(d / "twin_letterbox.png")  # 720x719
    q = picture(400)
    q.save(d / "q_95.jpg", quality=95)
    q.save(d / "q_70.jpg", quality=70)
    bars = picture(500)
    bars.save(d / "bars_clean.png")
    letterbox(bars, 140).save(d / "bars_letterbox.png")  # same content pixels, black bars around
    picture(600).save(d / "copy_a.png")
    (d / "copy_b.png").write_bytes((d / "copy_a.png").read_bytes())
    m = d.parent / "k.parquet"
    assert run("ingest", d, "--out", m).returncode == 0
    r = run("dedupe", m)
    assert r.returncode == 0, r.stderr
    assert "keepers by what decided: lossless 6, colour 2" in r.stdout  # the summary counts the reasons
    return m


def kept(rows, *names):
    """(kept name, its reason) of a cluster, checking the others point at it with the same reason."""
    keepers = [n for n in names if rows[n]["dup_of"] is None]
    assert len(keepers) == 1, [(n, rows[n]["dup_of"]) for n in names]
    k = rows[keepers[0]]
    for n in names:
        assert rows[n]["dup_of"] in (None, k["key"]) and rows[n]["keeper_reason"] == k["keeper_reason"], n
    return keepers[0], k["keeper_reason"]


def test_keeper_lossless_original_over_its_jpeg(keepers):
    rows = rows_by_name(keepers)
    for n in range(1, 7):
        assert kept(rows, f"cg{n:02d}_original.png", f"cg{n:02d}_q70.jpg") == (f"cg{n:02d}_original.png", "lossless")


def test_keeper_colour_over_greyscale(keepers):
    rows = rows_by_name(keepers)
    assert rows["colour_grey.png"]["grey"] and not rows["colour.png"]["grey"]
    assert kept(rows, "colour.png", "colour_grey.png") == ("colour.png", "colour")
    assert kept(rows, "vivid.png", "vivid_grey.jpg") == ("vivid.png", "colour")


def test_keeper_clean_twin_over_letterboxed_frame(keepers):
    rows = rows_by_name(keepers)
    lb, clean = rows["twin_letterbox.png"], rows["twin_clean.png"]
    assert lb["width"] * lb["height"] > clean["width"] * clean["height"]  # most pixels would keep the frame
    assert kept(rows, "twin_clean.png", "twin_letterbox.png") == ("twin_clean.png", "more content pixels")
    assert abs(lb["content_px"] - 720 * 405) < 0.02 * 720 * 405


def test_keeper_higher_quality_no_bars_and_key_order(keepers):
    rows = rows_by_name(keepers)
    assert (rows["q_95.jpg"]["jpeg_quality"], rows["q_70.jpg"]["jpeg_quality"]) == (95, 70)
    assert rows["bars_clean.png"]["jpeg_quality"] is None
    assert kept(rows, "q_95.jpg", "q_70.jpg") == ("q_95.jpg", "higher quality")
    assert kept(rows, "bars_clean.png", "bars_letterbox.png") == ("bars_clean.png", "no bars")
    first = min(("copy_a.png", "copy_b.png"), key=lambda n: rows[n]["key"])
    assert kept(rows, "copy_a.png", "copy_b.png") == (first, "key order")
    assert rows["q_95.jpg"]["keeper_reason"] in REASONS
    assert all(r["keeper_reason"] is None for r in rows.values() if r["dup_of"] is None
               and not any(x["dup_of"] == r["key"] for x in rows.values()))  # singles: no reason


# --- hashes every reader keeps exact ------------------------------------------------------


def test_hex_round_trip_at_the_edges():
    for v in (-(2**63), -1, 0, 1, 2**63 - 1, 0x0123456789ABCDEF):
        assert len(dedupe.to_hex(v)) == 16 and dedupe.from_hex(dedupe.to_hex(v)) == v
    assert dedupe.to_hex(-1) == "ffffffffffffffff" and dedupe.from_hex(None) is None


def test_hashes_exact_in_pandas_duckdb_polars_and_datasets(deduped, tmp_path):
    import datasets
    import duckdb
    import pandas as pd
    polars = pytest.importorskip("polars")

    m, _ = deduped
    ref = pq.read_table(m).select(["key", "phash", "dhash"]).to_pylist()
    want = {r["key"]: (r["phash"], r["dhash"]) for r in ref}
    assert sum(p is None for p, _ in want.values()) >= 1  # the broken file: nullable
    assert all(len(p) == 16 and int(p, 16) >= 0 for p, _ in want.values() if p is not None)
    assert len({p for p, _ in want.values() if p and int(p, 16) >= 2**63}) >= 1  # top bit set: int64 < 0

    df = pd.read_parquet(m)  # pandas' defaults: a nullable int64 would come back float64
    readers = {
        "pandas": dict(zip(df["key"], zip(df["phash"], df["dhash"]))),
        "duckdb": {k: (p, d) for k, p, d in duckdb.sql(f"select key, phash, dhash from read_parquet('{m}')").fetchall()},
        "polars": {r["key"]: (r["phash"], r["dhash"]) for r in polars.read_parquet(m).iter_rows(named=True)},
        "datasets": {r["key"]: (r["phash"], r["dhash"])
                     for r in datasets.Dataset.from_parquet(str(m), cache_dir=str(tmp_path / "hf"))},
    }
    for name, got in readers.items():
        got = {k: tuple(None if pd.isna(v) else v for v in pair) for k, pair in got.items()}
        assert got == want, name


def test_manifest_with_int64_hashes_still_reads(deduped, tmp_path):
    from curate import manifest

    m, _ = deduped
    table = pq.read_table(m)
    old = table
    for c in ("phash", "dhash"):
        ints = pa.array([dedupe.from_hex(v) for v in table.column(c).to_pylist()], pa.int64())
        old = old.set_column(old.column_names.index(c), c, ints)
    legacy = tmp_path / "legacy.parquet"
    pq.write_table(old, legacy)
    got, _ = manifest.read(legacy)
    assert got.column("phash").to_pylist() == table.column("phash").to_pylist()
    h, stats = dedupe.hash_rows(got, m.parent, cached=True, workers=1)  # stored int64 hashes are reused
    assert stats["hashed"] == 0 and stats["reused"] > 10
    assert h.column("dhash").to_pylist() == table.column("dhash").to_pylist()  # the same hashes, as hex
