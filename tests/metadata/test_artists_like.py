"""`curate artists --like` (issue 27): artists ranked by a planted likeness to a CG set, with
images from a real HTTP server, a seeded sample, images on disk reused, a resumable cache."""

import hashlib
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")
from curate.demo.synthetic import make_posts  # noqa: E402
from curate.metadata.artists_like import rank_like, seeded_sample  # noqa: E402
from curate.metadata.sources import open_source  # noqa: E402
from tests.dataset.test_dedupe import picture  # noqa: E402
from tests.dataset.test_score import make_model  # noqa: E402
from tests.images.test_download import Server  # noqa: E402
from tests.inproc import run_curate  # noqa: E402


def jpeg(im) -> bytes:
    b = io.BytesIO()
    im.save(b, "JPEG", quality=90)
    return b.getvalue()


def noise(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("like")
    model = d / "model"
    model.mkdir()
    make_model(model)
    (d / "cg").mkdir()
    for k in range(4):
        picture(70 + k, 160, 120).save(d / "cg" / f"cg{k}.png")
    cg = d / "cg.parquet"
    assert run_curate("ingest", d / "cg", "--out", cg).returncode == 0
    srv = Server()
    # imitator: crops of the CG pictures; mixed: half crops, half noise; other: noise only
    crop = lambda k: picture(70 + k % 4, 170, 128).crop((k, k, 160 + k, 120 + k))  # noqa: E731
    drawn = {"imitator": [crop(k) for k in range(6)],
             "mixed": [crop(k + 1) if k % 2 else noise(k) for k in range(6)],
             "other": [noise(100 + k) for k in range(6)]}
    posts = make_posts(18, seed=3)
    on_disk = d / "images"
    for p, (artist, im) in zip(posts, [(a, im) for a, ims in drawn.items() for im in ims]):
        data = jpeg(im)
        md5 = hashlib.md5(data).hexdigest()
        p.update(md5=md5, file_ext="jpg", fav_count=100, is_deleted=False, is_banned=False, file_url=srv.add(f"/{md5}.jpg", data),
                 tag_string_artist=artist, tag_string_copyright="blue_archive")
        p["tag_string"] = " ".join([artist, "blue_archive", *p["tag_string_general"].split()])
        if artist == "other" and p is posts[-1]:  # one already downloaded: reused, never fetched
            (on_disk / md5[:2]).mkdir(parents=True)
            (on_disk / md5[:2] / f"{md5}.jpg").write_bytes(data)
            disk_path = f"/{md5}.jpg"
    (d / "posts.jsonl").write_text("\n".join(json.dumps(p) for p in posts))
    yield d, model, cg, srv, disk_path
    srv.httpd.shutdown()
    srv.httpd.server_close()


def test_artists_ranked_by_planted_likeness_and_resumable(world):
    d, model, cg, srv, disk_path = world
    src = open_source(f"dump:{d / 'posts.jsonl'}")
    s = rank_like(cg, src, model, copyright="blue_archive", min_posts=5, sample=4, seed=9,
                  images=d / "images", cache=d / "cache", device="cpu")
    assert [r.artist for r in s.rows] == ["imitator", "mixed", "other"]
    assert s.rows[0].score > s.rows[1].score > s.rows[2].score
    assert all(len(r.sample) == 4 and r.posts == 6 for r in s.rows)
    assert s.cg_images == 4 and s.fetched + s.on_disk == 12 and s.cached == 0
    assert srv.hits.get(disk_path, 0) == 0  # on disk: reused
    hits = dict(srv.hits)
    again = rank_like(cg, open_source(f"store:{d / 'store'}") if (d / "store").exists() else src, model,
                      copyright="blue_archive", min_posts=5, sample=4, seed=9, images=d / "images",
                      cache=d / "cache", device="cpu")
    assert [(r.artist, r.sample) for r in again.rows] == [(r.artist, r.sample) for r in s.rows]  # deterministic
    assert again.fetched == 0 and again.embedded == 0 and dict(srv.hits) == hits  # all from the cache
    other = rank_like(cg, src, model, copyright="blue_archive", min_posts=5, sample=4, seed=10,
                      images=d / "images", cache=d / "cache", device="cpu")
    assert [r.sample for r in other.rows] != [r.sample for r in s.rows]  # another seed, another sample


def test_seeded_sample_is_source_order_blind():
    posts = [(pid, None, None) for pid in range(100, 130)]
    assert seeded_sample(posts, 5, 1) == seeded_sample(posts[::-1], 5, 1)


def test_cli_writes_the_ranked_artists_file(world):
    d, model, cg, srv, _ = world
    out = d / "artists" / "like.txt"
    # the command in this process (tests/inproc.py): a new interpreter would import torch again
    r = run_curate("artists", "--like", cg, "--model", model, "--source",
                   f"dump:{d / 'posts.jsonl'}", "--copyright", "blue_archive", "--sample", "4", "--seed", "9",
                   "--cache", d / "cache", "--out", out)
    assert r.returncode == 0, r.stderr
    lines = [x for x in out.read_text().splitlines() if not x.startswith("#")]
    assert [x.split()[0] for x in lines] == ["imitator", "mixed", "other"]
    assert all("like=" in x and "sample=" in x for x in lines)
    page = out.with_suffix(".html").read_text()  # each artist's sample beside its score
    assert page.count('class="row"') == 3 and page.index("imitator") < page.index("other")
    # (the image on disk under --images is not named here: its cached embedding is used, a placeholder shown)
    assert page.count("<img") + page.count('class="noimg"') == 4 + 3 * 4 and all((out.parent / src).is_file()
                                                   for src in re.findall(r'src="([^"]+)"', page))
    r = run_curate("artists", "--like", cg, "--source", f"dump:{d / 'posts.jsonl'}", "--copyright", "blue_archive")
    assert r.returncode == 2 and "--like needs --model" in r.stderr
