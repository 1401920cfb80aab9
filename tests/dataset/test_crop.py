"""`curate crop` and the border detector: real files, the real CLI, real Parquet."""

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from curate.dataset import borders
from tests.inproc import in_new_process as curate  # the command in a new interpreter
from tests.inproc import run_curate as run  # the stage in this process


def picture(seed: int, w: int = 640, h: int = 360) -> Image.Image:
    """A flat-shaded scene with a sky gradient and outlined shapes (CG-like)."""
    rng = np.random.default_rng(seed)
    col = lambda: tuple(int(c) for c in rng.integers(30, 230, 3))  # noqa: E731
    top, bottom = np.array(col()), np.array(col())
    t = np.linspace(0, 1, h)[:, None, None]
    im = Image.fromarray((top * (1 - t) + bottom * t).repeat(w, axis=1).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.rectangle([0, int(h * 0.7), w, h], fill=col())
    for _ in range(10):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.05, 0.2) * min(w, h)
        d.ellipse([x - r, y - r, x + r, y + r], fill=col(), outline=(10, 10, 10), width=3)
    return im


def framed(im, left, top, right, bottom, colour):
    out = Image.new("RGB", (im.width + left + right, im.height + top + bottom), colour)
    out.paste(im, (left, top))
    return out


def jpeg(im, q):
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def near(box, truth, tol=2):
    return max(abs(a - b) for a, b in zip(box, truth)) <= tol


# --- the detector ----------------------------------------------------------------------


@pytest.mark.parametrize("colour", [(0, 0, 0), (255, 255, 255), (128, 128, 128), (40, 90, 160)])
@pytest.mark.parametrize("q", [None, 65, 92])
def test_detects_letterbox_pillarbox_and_frames(colour, q):
    im = picture(3)
    neutral = max(colour) - min(colour) < 16
    cases = [(0, 90, 0, 90), (107, 0, 107, 0), (24, 24, 24, 24)]  # letterbox, pillarbox, frame
    for l, t, r, b in cases:
        f = framed(im, l, t, r, b, colour)
        f = jpeg(f, q) if q else f
        frame = l and t
        # bars of a colour (a blue field on two sides) are content; a frame on all four sides is not
        truth = (l, t, l + im.width, t + im.height) if neutral or frame else (0, 0, f.width, f.height)
        assert near(borders.detect(f), truth), (colour, q, l, t)


def test_clean_pictures_are_left_alone():
    for seed in range(6):
        im = picture(seed)
        assert borders.detect(im) == (0, 0, im.width, im.height)
        assert borders.detect(jpeg(im, 70)) == (0, 0, im.width, im.height)


def test_never_trims_a_dark_or_bright_picture_away():
    dark = Image.new("RGB", (800, 450), (0, 0, 0))
    ImageDraw.Draw(dark).ellipse([380, 200, 420, 240], fill=(250, 240, 200))
    assert borders.detect(dark) == (0, 0, 800, 450)
    assert borders.detect(jpeg(dark, 60)) == (0, 0, 800, 450)
    for colour in ((255, 255, 255), (0, 0, 0), (10, 200, 30)):
        flat = Image.new("RGB", (300, 200), colour)
        assert borders.detect(flat) == (0, 0, 300, 200)
    assert borders.detect(Image.new("RGB", (1, 1))) == (0, 0, 1, 1)
    assert borders.detect(Image.new("L", (20000, 100), 77)) == (0, 0, 20000, 100)


# --- the stage, through the CLI ----------------------------------------------------------


@pytest.fixture
def cg(tmp_path):
    d = tmp_path / "cg"
    d.mkdir()
    pic = picture(1, 800, 450)
    framed(pic, 0, 75, 0, 75, (0, 0, 0)).save(d / "letterbox.png")                 # 800x600
    framed(pic, 100, 0, 100, 0, (255, 255, 255)).save(d / "pillarbox.jpg", quality=88)  # 1000x450
    picture(2, 2000, 1500).save(d / "big.png")
    rgba = picture(4).convert("RGBA")
    rgba.putalpha(200)
    rgba.save(d / "alpha.png")
    picture(5).convert("L").save(d / "grey.png")
    dark = Image.new("RGB", (640, 360), (0, 0, 0))
    ImageDraw.Draw(dark).ellipse([300, 160, 340, 200], fill=(255, 240, 200))
    dark.save(d / "dark.png")
    Image.new("RGB", (400, 300), (255, 255, 255)).save(d / "white.png")
    Image.new("RGB", (1, 1), (5, 6, 7)).save(d / "one.png")
    Image.new("RGB", (20000, 100), (90, 40, 140)).save(d / "strip.png")
    (d / "broken.png").write_bytes(b"garbage")
    m = tmp_path / "cg.parquet"
    assert run("ingest", d, "--out", m).returncode == 0
    return d, m


def rows_by_name(m):
    return {Path(r["source_path"]).name: r for r in pq.read_table(m).to_pylist()}


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_crop_trims_and_downscales_into_a_separate_folder(cg, tmp_path):
    d, m = cg
    originals = digests(d)
    r = run("crop", m, "--max-pixels", "640x640")
    assert r.returncode == 0, r.stderr
    assert "1 failed" not in r.stdout and "derived images:" in r.stdout
    assert digests(d) == originals  # originals untouched
    rows = rows_by_name(m)
    out_dir = tmp_path / "cg_crops"

    lb = rows["letterbox.png"]
    assert near(lb["crop"], [0, 75, 800, 525])
    assert lb["source_path"] == "cg/letterbox.png"
    derived = tmp_path / lb["path"]
    assert derived.parent == out_dir and derived.suffix == ".png"
    with Image.open(derived) as im:
        assert abs(im.width / im.height - 800 / 450) < 0.01  # trimmed: 16:9 again
        assert im.width * im.height <= 640 * 640

    pb = rows["pillarbox.jpg"]
    assert near(pb["crop"], [100, 0, 900, 450]) and pb["path"].endswith(".jpg")

    big = rows["big.png"]
    assert big["crop"] == [0, 0, 2000, 1500]
    with Image.open(tmp_path / big["path"]) as im:
        assert im.width * im.height <= 640 * 640 and abs(im.width / im.height - 4 / 3) < 0.01

    for name in ("dark.png", "white.png", "one.png", "alpha.png", "grey.png"):
        row = rows[name]
        assert row["crop"] == [0, 0, row["width"], row["height"]], name
    assert rows["dark.png"]["path"] == "cg/dark.png"  # nothing to do: stays on the original
    strip = rows["strip.png"]
    assert strip["crop"] == [0, 0, 20000, 100]
    with Image.open(tmp_path / strip["path"]) as im:
        assert im.width * im.height <= 640 * 640 and im.width > 50 * im.height
    assert rows["broken.png"]["crop"] is None and rows["broken.png"]["path"] == "cg/broken.png"


def test_rerun_is_idempotent_and_new_settings_redo(cg, tmp_path):
    d, m = cg
    assert run("crop", m).returncode == 0
    first = pq.read_table(m).to_pylist()
    r = run("crop", m)
    assert r.returncode == 0 and " 0 processed" in r.stdout
    assert pq.read_table(m).to_pylist() == first

    r = run("crop", m, "--no-trim-borders", "--out-dir", tmp_path / "plain")
    assert r.returncode == 0 and " 0 processed" not in r.stdout
    rows = rows_by_name(m)
    assert rows["letterbox.png"]["crop"] == [0, 0, 800, 600]
    assert rows["letterbox.png"]["path"] == "cg/letterbox.png"  # no trim, no downscale


def test_duplicates_are_skipped(cg, tmp_path):
    d, m = cg
    framed(picture(1, 800, 450), 0, 75, 0, 75, (0, 0, 0)).save(d / "letterbox_again.jpg", quality=80)
    assert run("ingest", d, "--out", m).returncode == 0
    assert run("dedupe", m).returncode == 0
    r = run("crop", m)
    assert r.returncode == 0 and "2 duplicates" in r.stdout  # the pillarbox holds the same picture
    rows = rows_by_name(m)
    trio = [rows[n] for n in ("letterbox.png", "letterbox_again.jpg", "pillarbox.jpg")]
    assert len({x["dup_of"] or x["key"] for x in trio}) == 1
    assert sum(x["dup_of"] is None for x in trio) == 1
    for x in trio:
        assert (x["crop"] is None) == (x["dup_of"] is not None)


def test_bad_input_is_one_line_error(cg, tmp_path):
    d, m = cg
    before = m.read_bytes()
    for args in (["--max-pixels", "lots"], ["--max-pixels", "10x10"]):
        r = curate("crop", m, *args)
        assert r.returncode == 2 and r.stderr.startswith("error: ")
        assert len(r.stderr.strip().splitlines()) == 1
    assert m.read_bytes() == before
    assert curate("crop", tmp_path / "missing.parquet").returncode == 2


def test_killed_worker_keeps_finished_rows_and_a_rerun_finishes(cg, tmp_path):
    d, m = cg
    env = {**os.environ, "CURATE_POOL_KILL": "4"}  # the worker given the 5th image dies (OOM killer)
    r = subprocess.run([sys.executable, "-m", "curate", "crop", m, "--workers", "2"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: cropping: a worker process was killed")
    done = [x for x in pq.read_table(m).to_pylist() if x["crop"] is not None]
    assert 0 < len(done) < 9
    r = curate("crop", m, "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert f"{len(done)} done before" in r.stdout
    assert sum(x["crop"] is not None for x in pq.read_table(m).to_pylist()) == 9  # all but broken.png
