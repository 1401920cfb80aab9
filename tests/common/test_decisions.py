"""curate/review/decisions.py: the decisions store, and every stage obeying it.

Real images are ingested, deduped, cropped and captioned by the real stages (once per
module; each test works on its own copy); the person's decisions go through the same
sidecar the web app writes. `curate review --apply/--export` runs in this process
(tests/inproc.py), but for the pipe in and out, which is a real process's stdin and stdout.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curate import manifest
from curate.common import decisions
from curate.dataset import caption, crop, dedupe, export
from curate.errors import CurateError
from curate.report import html as report
from curate.report import inspect
from tests.inproc import run_curate

CURATE = str(Path(sys.executable).with_name("curate"))
HOSTILE = '<img src=x onerror="document.title=\'pwned\'">'  # tag names come from the internet


def pattern(seed: int, size=(480, 320)) -> Image.Image:
    """A blocky random picture: distinct perceptual hashes per seed, stable when resized."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)


def make_images(folder: Path) -> None:
    folder.mkdir(parents=True)
    pattern(1).save(folder / "a_big.png")
    pattern(1, (240, 160)).save(folder / "a_small.png")     # near duplicate of a_big
    pattern(1, (360, 240)).save(folder / "a_mid.png")       # and another
    boxed = Image.new("RGB", (480, 400))                    # letterboxed: black bars top and bottom
    boxed.paste(pattern(2), (0, 40))
    boxed.save(folder / "b_letterbox.png")
    pattern(3).save(folder / "c.png")
    pattern(4, (320, 480)).save(folder / "d_tall.png")


def make_manifest(root: Path, run_stages: bool = True) -> Path:
    """Ingest, tag (source tags written in), dedupe and crop a small folder of real images."""
    make_images(root / "cg")
    m = root / "m" / "cg.parquet"
    r = run_curate("ingest", root / "cg", "--out", m, "--name", "cg", "--workers", "1")
    assert r.returncode == 0, r.stderr
    table, meta = manifest.read(m)
    names = [Path(p).stem for p in table.column("path").to_pylist()]
    tags = [["1girl", "solo", name.split("_")[0] + "_pattern", HOSTILE] for name in names]
    manifest.write(manifest.with_column(table, "tags_general", tags), m, meta)
    if run_stages:
        dedupe.run(m, workers=1)
        crop.run(m, workers=1)
        caption.run(m)
    return m


def rows(m: Path) -> dict[str, dict]:
    """file stem -> row."""
    return {Path(r["source_path"] or r["path"]).stem: r for r in manifest.read(m)[0].to_pylist()}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """make_manifest's tree, built once for the module."""
    return make_manifest(tmp_path_factory.mktemp("made"))


@pytest.fixture
def m(tmp_path, made) -> Path:
    """A test's own copy of the made tree (tests change it): images, manifest, crops and
    caption files at the same places under tmp_path. Row paths are relative; the
    provenance's folders (ingest's folder, crop's out_dir) are pointed at the copy, as
    make_manifest(tmp_path) would have recorded them."""
    root = made.parent.parent
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    m = tmp_path / made.relative_to(root)
    table, meta = manifest.read(m)
    manifest.write(table, m, json.loads(json.dumps(meta).replace(str(root), str(tmp_path))))
    return m


def decide(m, *lines, who="tester"):
    return decisions.append(m, list(lines), who=who)


# --- the store ------------------------------------------------------------------


def test_records_are_kept_with_who_when_and_previous_value(m):
    r = rows(m)
    key = r["c"]["key"]
    decide(m, {"key": key, "action": "drop", "reason": "blurry"})
    decide(m, {"key": key, "action": "drop", "reason": "off model"})
    log = [json.loads(x) for x in decisions.sidecar(m).read_text().splitlines()]
    assert [x["who"] for x in log] == ["tester", "tester"] and all(x["at"] for x in log)
    assert log[0]["prev"]["dropped"] is None and log[1]["prev"]["dropped"] == "blurry"
    assert decisions.current(m).dropped == {key: "off model"}
    # a stage rewriting the manifest does not touch them
    caption.run(m)
    assert decisions.current(m).dropped == {key: "off model"}


def test_undo_reverses_and_redo_reverses_the_undo(m):
    key = rows(m)["c"]["key"]
    (first,) = decide(m, {"key": key, "action": "caption", "text": "one"})
    (second,) = decide(m, {"key": key, "action": "caption", "text": "two"})
    (undo,) = decisions.append(m, [], undo=[second["id"]])
    assert decisions.current(m).captions() == {key: "one"}
    decisions.append(m, [], undo=[undo["id"]])
    assert decisions.current(m).captions() == {key: "two"}
    decisions.append(m, [], undo=[first["id"]])  # undoing the first brings back its prev: generated
    assert decisions.current(m).captions() == {}
    with pytest.raises(CurateError, match="no decision 'nope' to undo"):
        decisions.append(m, [], undo=["nope"])


def test_a_torn_last_line_loses_nothing_before_it(m):
    key = rows(m)["c"]["key"]
    decide(m, {"key": key, "action": "drop"})
    with open(decisions.sidecar(m), "a") as f:
        f.write('{"key": "x", "act')  # a writer killed mid-line
    assert decisions.current(m).dropped == {key: ""}
    decide(m, {"key": key, "action": "restore"})  # the next append starts on a fresh line
    assert decisions.current(m).dropped == {}
    lines = decisions.sidecar(m).read_text().splitlines()
    lines.insert(0, "garbage")
    decisions.sidecar(m).write_text("\n".join(lines) + "\n")
    with pytest.raises(CurateError, match=r"decisions.jsonl:1: damaged decision record"):
        decisions.current(m)


def test_apply_checks_every_line_first_and_names_the_bad_one(m, tmp_path):
    r = rows(m)
    good = {"key": r["c"]["key"], "action": "drop", "reason": "x"}
    cases = [
        ({"key": "local/nope", "action": "drop"}, "unknown key 'local/nope'"),
        ({"key": r["c"]["key"], "action": "burn"}, "unknown action 'burn'"),
        ({"key": r["c"]["key"], "action": "crop", "box": [0, 0, 481, 100]}, "is outside the 480x320 image"),
        ({"key": r["c"]["key"], "action": "crop", "box": [10, 10, 5, 100]}, "is outside"),
        ({"key": r["c"]["key"], "action": "crop", "box": [0, 0, 1.5, 100]}, "whole pixels"),
        ({"key": r["c"]["key"], "action": "drop", "box": [0, 0, 1, 1]}, "unknown field 'box'"),
        ({"key": [r["c"]["key"]], "action": "drop"}, "unknown key ["),   # JSON of the wrong shape
        ({"key": {"k": 1}, "action": "drop"}, "unknown key {"),
        ({"key": r["c"]["key"], "action": ["drop"]}, "unknown action ['drop']"),
    ]
    for bad, message in cases:
        f = tmp_path / "d.jsonl"
        f.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
        with pytest.raises(CurateError) as err:
            decisions.apply_file([m], f)
        assert str(err.value).startswith(f"{f}:3: ") and message in str(err.value)
        assert "\n" not in str(err.value)
        assert decisions.current(m).dropped == {}  # nothing applied from a file with an error
    f.write_text("{not json\n")
    with pytest.raises(CurateError, match=r"d.jsonl:1: not JSON"):
        decisions.apply_file([m], f)


def test_apply_export_round_trip_through_the_cli(m, tmp_path):
    r = rows(m)
    lines = [
        {"key": r["c"]["key"], "action": "drop", "reason": "off <model>"},
        {"key": r["a_small"]["key"], "action": "keeper"},
        {"key": r["b_letterbox"]["key"], "action": "crop", "box": [10, 40, 470, 360]},
        {"key": r["d_tall"]["key"], "action": "caption", "text": "1girl, solo, edited"},
        {"key": r["a_mid"]["key"], "action": "seen"},
    ]
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    res = run_curate("review", m, "--apply", f, "--export", tmp_path / "out.jsonl")
    assert res.returncode == 0, res.stderr
    assert "applied 5 decisions" in res.stdout and "exported 5 decisions" in res.stdout
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert out == lines
    # applying the export to a fresh copy of the manifest gives the same state
    copy = tmp_path / "copy.parquet"
    copy.write_bytes(m.read_bytes())
    decisions.apply_file([copy], tmp_path / "out.jsonl")
    assert decisions.current(copy).state == decisions.current(m).state
    # a bad file: one line on stderr, exit 2, nothing applied
    f.write_text(json.dumps({"key": "danbooru/1", "action": "drop"}) + "\n")
    res = run_curate("review", copy, "--apply", f)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "in.jsonl:1: unknown key" in res.stderr


def test_apply_from_stdin_with_a_bom_and_export_to_stdout(m, tmp_path):
    """Scripted use: a file saved by a Windows editor (BOM), a pipe in, a pipe out."""
    r = rows(m)
    lines = [{"key": r["c"]["key"], "action": "drop", "reason": "blurry"},
             {"key": r["d_tall"]["key"], "action": "caption", "text": "1girl, kept"}]
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(x) + "\r\n" for x in lines[:1]).encode())
    assert decisions.apply_file([m], f) == {str(m): 1}
    res = subprocess.run([CURATE, "review", m, "--apply", "-", "--export", "-"], capture_output=True, text=True,
                         input=json.dumps(lines[1]) + "\n", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert [json.loads(x) for x in res.stdout.splitlines()] == lines  # stdout is the JSONL alone
    assert "applied 1 decisions from -" in res.stderr and "exported 2 decisions to standard output" in res.stderr
    assert not (tmp_path / "-").exists()
    (tmp_path / "afile").write_text("not a folder")
    res = run_curate("review", m, "--export", tmp_path / "afile" / "d.jsonl")
    assert res.returncode == 2 and res.stderr.startswith("error: cannot write") and "Traceback" not in res.stderr


# --- the stages obey ---------------------------------------------------------------


def test_dedupe_keeps_the_chosen_keeper_and_split_clusters(m):
    r = rows(m)
    big, mid, small = (r[n]["key"] for n in ("a_big", "a_mid", "a_small"))
    assert r["a_small"]["dup_of"] == big and r["a_mid"]["dup_of"] == big  # most pixels kept
    decide(m, {"key": small, "action": "keeper"})
    dedupe.run(m, workers=1)
    r = rows(m)
    assert r["a_small"]["dup_of"] is None and r["a_big"]["dup_of"] == small and r["a_mid"]["dup_of"] == small
    assert {r[n]["keeper_reason"] for n in ("a_big", "a_mid", "a_small")} == {"review"}  # what decided
    decide(m, {"key": mid, "action": "split"})
    dedupe.run(m, workers=1)
    r = rows(m)
    assert r["a_mid"]["dup_of"] is None and r["a_big"]["dup_of"] == small
    assert r["a_mid"]["keeper_reason"] is None and r["a_small"]["keeper_reason"] == "review"
    # splitting the keeper out: the rest regroup under the best of them (most pixels)
    decide(m, {"key": small, "action": "split"})
    dedupe.run(m, workers=1)
    r = rows(m)
    assert r["a_small"]["dup_of"] is None and r["a_big"]["dup_of"] is None and r["a_mid"]["dup_of"] is None
    # what dedupe wrote already follows the decisions: applying them again changes nothing
    t, meta = manifest.read(m)
    assert decisions.current(m).applied(t).column("dup_of").to_pylist() == t.column("dup_of").to_pylist()


def test_crop_uses_the_chosen_box_and_a_reset_goes_back_to_automatic(m):
    r = rows(m)
    key = r["b_letterbox"]["key"]
    auto = r["b_letterbox"]["crop"]
    assert auto == [0, 40, 480, 360]  # the bars were found
    decide(m, {"key": key, "action": "crop", "box": [100, 50, 400, 300]})
    s = crop.run(m, workers=1)
    r = rows(m)
    assert r["b_letterbox"]["crop"] == [100, 50, 400, 300] and s.processed == 1
    assert Image.open(m.parent / r["b_letterbox"]["path"]).size == (300, 250)
    assert crop.run(m, workers=1).processed == 0  # re-running changes nothing the person decided
    assert rows(m)["b_letterbox"]["crop"] == [100, 50, 400, 300]
    decide(m, {"key": key, "action": "crop", "box": None})
    crop.run(m, workers=1)
    assert rows(m)["b_letterbox"]["crop"] == auto


def test_caption_keeps_edited_text_and_regenerates_the_rest(m):
    r = rows(m)
    key = r["c"]["key"]
    decide(m, {"key": key, "action": "caption", "text": "1girl, my words"})
    caption.run(m)
    r = rows(m)
    assert r["c"]["caption"] == "1girl, my words"
    assert (m.parent / r["c"]["caption_file"]).read_text() == "1girl, my words"
    assert r["d_tall"]["caption"].startswith("1girl, solo") and "d pattern" in r["d_tall"]["caption"]
    caption.run(m)
    assert rows(m)["c"]["caption"] == "1girl, my words"


def test_export_report_and_inspect_follow_drops(m, tmp_path):
    r = rows(m)
    key = r["c"]["key"]
    decide(m, {"key": key, "action": "drop", "reason": "off model"})
    decide(m, {"key": r["d_tall"]["key"], "action": "seen"})
    decide(m, {"key": r["b_letterbox"]["key"], "action": "caption", "text": "x"})
    s = export.run([m], tmp_path / "kohya")
    assert s.skipped["dropped in review"] == 1
    metadata = json.loads((tmp_path / "kohya" / "metadata.json").read_text())
    assert len(metadata) == 3 and not any(key.replace("/", "_") in p for p in metadata)
    report.build([m], tmp_path / "r.html", workers=1)
    assert key not in (tmp_path / "r.html").read_text() and r["d_tall"]["key"] in (tmp_path / "r.html").read_text()
    info = inspect.inspect(m)
    assert info["review"] == {"looked_at": 3, "dropped": 1, "edited": 1}
    assert "review: 3 looked at, 1 dropped, 1 edited by a person" in inspect.render(info)


def test_train_leaves_dropped_rows_out(m, tmp_path):
    from collections import Counter

    from curate.common.buckets import Buckets
    from curate.common.train_config import DatasetConfig
    from curate.train import data as train_data

    r = rows(m)
    decide(m, {"key": r["c"]["key"], "action": "drop"})
    skipped = Counter()
    samples = train_data._read_dataset(DatasetConfig(manifest=m), 0, Buckets((256, 256), 64, 512, 32), skipped)
    keys = {s.key for s in samples}
    assert r["c"]["key"] not in keys and r["d_tall"]["key"] in keys and skipped["dropped in review"] == 1


def test_two_writers_at_once_lose_nothing(m):
    """The server and a script (or two servers) appending together, while a stage rewrites the manifest."""
    keys = list(rows(m))
    key_of = {n: r["key"] for n, r in rows(m).items()}
    script = ("import sys; from curate.common import decisions\n"
              "for i in range(40): decisions.append(sys.argv[1], [{'key': sys.argv[2], 'action': 'caption', 'text': f'{sys.argv[3]} {i}'}])")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(m), key_of[name], name])
             for name in keys[:2]]
    caption.run(m)  # a stage rewriting the manifest meanwhile
    assert all(p.wait(120) == 0 for p in procs)
    log = decisions.current(m).log
    assert len(log) == 80 and len({r["id"] for r in log}) == 80
    for name in keys[:2]:  # each writer's records in its order, each prev the one before
        mine = [r for r in log if r["key"] == key_of[name]]
        assert [r["text"] for r in mine] == [f"{name} {i}" for i in range(40)]
        assert [r["prev"]["caption"] for r in mine[1:]] == [r["text"] for r in mine[:-1]]


def test_export_and_train_warn_of_boxes_and_text_not_yet_applied(m, tmp_path):
    """A person who reviews and then exports (or trains) without re-running crop and
    caption is told, in both routes, which stage to re-run; afterwards, no warning."""
    from curate.common import train_config
    from curate.train import data as train_data

    r = rows(m)
    decide(m, {"key": r["c"]["key"], "action": "crop", "box": [20, 10, 460, 300]},
           {"key": r["d_tall"]["key"], "action": "caption", "text": "1girl, my \\(words\\)"},
           {"key": r["b_letterbox"]["key"], "action": "caption", "text": r["b_letterbox"]["caption"]},
           {"key": r["a_small"]["key"], "action": "crop", "box": [0, 0, 100, 100]})  # a duplicate: no stage uses it
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'pretrained = "tiny-random"\noutput_dir = "{tmp_path / "run"}"\nmax_train_steps = 1\n'
                   f'[[datasets]]\nmanifest = "{m}"\n')
    expected = f"{m}: not in the manifest yet: 1 crop boxes from review (curate crop); " \
               "1 captions from review (curate caption): re-run those stages"
    assert export.run([m], tmp_path / "kohya").review_pending == [expected]
    assert expected in train_data.plan(train_config.load(cfg)).summary()["warnings"]
    crop.run(m, workers=1)
    caption.run(m)
    assert rows(m)["d_tall"]["caption"] == "1girl, my (words)"
    s = export.run([m], tmp_path / "kohya")
    assert s.review_pending == [] and not any("review decisions" in line for line in s.lines())
    assert not any("review" in w for w in train_data.plan(train_config.load(cfg)).summary()["warnings"])


def reg_repost_of_c(tmp_path: Path) -> Path:
    """A one-post reg manifest whose image is the CG `c.png` again (a repost)."""
    import pyarrow as pa

    (tmp_path / "reg").mkdir()
    pattern(3).save(tmp_path / "reg" / "1.png")
    reg = tmp_path / "reg" / "reg.parquet"
    manifest.write(pa.Table.from_pylist([{"key": "danbooru/1", "subset": "horizontal", "path": "1.png",
                                          "width": 480, "height": 320, "caption": "solo"}]),
                   reg, manifest.new_provenance(kind="reg", class_token="solo"))
    return reg


def test_a_keeper_chosen_against_another_manifest_leaves_the_other_copy_out(m, tmp_path):
    """dedupe --against marked a CG as a repost of a reg post; the person keeps the CG: the
    reg copy leaves export and training (and the reg copy wins when chosen later)."""
    from curate.common import train_config
    from curate.train import data as train_data

    reg = reg_repost_of_c(tmp_path)
    table, meta = manifest.read(m)
    keys = table.column("key").to_pylist()
    cg_key = rows(m)["c"]["key"]
    manifest.write(manifest.with_column(table, "dup_of", [
        "danbooru/1" if k == cg_key else d for k, d in zip(keys, table.column("dup_of").to_pylist())]), m, meta)
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'pretrained = "tiny-random"\noutput_dir = "{tmp_path / "run"}"\nmax_train_steps = 1\n'
                   f'[[datasets]]\nmanifest = "{m}"\n[[datasets]]\nmanifest = "{reg}"\nis_reg = true\n')

    def used() -> tuple[set, set]:
        s = export.run([m, reg], tmp_path / "kohya")
        exported = {Path(p).stem for p in json.loads((tmp_path / "kohya" / "metadata.json").read_text())}
        exported |= {p.stem.split("_", 1)[1] for p in (tmp_path / "kohya" / "reg").rglob("*.png")}
        trained = {smp.key for smp in train_data.plan(train_config.load(cfg)).samples}
        return {k for k in (cg_key, "danbooru/1") if k.replace("/", "_") in exported}, \
            {k for k in (cg_key, "danbooru/1") if k in trained} | {"skipped: " + str(sum(
                n for why, n in s.skipped.items() if "another manifest" in why))}

    assert used() == ({"danbooru/1"}, {"danbooru/1", "skipped: 0"})  # dedupe's choice
    decide(m, {"key": cg_key, "action": "keeper"})
    assert used() == ({cg_key}, {cg_key, "skipped: 1"})
    # the report and the review page show the reg copy as the duplicate now
    from curate.review.server import Review

    assert {r.data["key"]: r.data["dup_of"] for r in report.load([m, reg])[0]}["danbooru/1"] == cg_key
    state = Review([m, reg], "127.0.0.1", 0).state()
    assert state["rows"][1]["dup_of"] == [cg_key] and state["rows"][0]["dup_of"][keys.index(cg_key)] is None
    import time

    time.sleep(0.01)  # records carry millisecond times: this choice is the later one
    decisions.append(reg, [{"key": "danbooru/1", "action": "keeper"}], who="t")  # changed their mind
    assert used() == ({"danbooru/1"}, {"danbooru/1", "skipped: 1"})


def test_a_reg_copy_dropped_in_review_no_longer_marks_the_cg_as_its_duplicate(m, tmp_path):
    """dedupe --against marked a CG as a repost of a reg post; the person drops the reg post:
    a re-run of dedupe makes the CG a keeper again, so one copy is trained, not none."""
    reg = reg_repost_of_c(tmp_path)
    dedupe.run(m, against=[reg], workers=1)
    assert rows(m)["c"]["dup_of"] == "danbooru/1"  # the CG is a repost of the reg post
    decisions.append(reg, [{"key": "danbooru/1", "action": "drop", "reason": "wrong style"}], who="t")
    dedupe.run(m, against=[reg], workers=1)
    assert rows(m)["c"]["dup_of"] is None
    crop.run(m, workers=1)
    caption.run(m)
    export.run([m, reg], tmp_path / "kohya")
    exported = {Path(p).stem for p in json.loads((tmp_path / "kohya" / "metadata.json").read_text())}
    assert rows(m)["c"]["key"].replace("/", "_") in exported
    assert not list((tmp_path / "kohya").rglob("*danbooru_1.png"))


def test_dropping_a_clusters_keeper_keeps_its_next_best_copy(m, tmp_path):
    """The person drops the keeper (a bad copy): its duplicates are not lost with it."""
    from curate.common import train_config
    from curate.train import data as train_data

    r = rows(m)
    big, mid, small = (r[n]["key"] for n in ("a_big", "a_mid", "a_small"))
    decide(m, {"key": big, "action": "drop", "reason": "jpeg artefacts"})
    assert export.run([m], tmp_path / "kohya").review_pending == [  # skipped as a duplicate until now
        f"{m}: not in the manifest yet: 1 kept rows not cropped (curate crop); "
        "1 kept rows without a caption (curate caption): re-run those stages"]
    crop.run(m, workers=1)  # the loop: the stages run again (they skipped the duplicates before)
    caption.run(m)
    s = export.run([m], tmp_path / "kohya")
    exported = {Path(p).stem for p in json.loads((tmp_path / "kohya" / "metadata.json").read_text())}
    safe = lambda k: k.replace("/", "_")  # noqa: E731
    assert safe(mid) in exported and safe(big) not in exported and safe(small) not in exported  # 360x240 > 240x160
    assert s.skipped["dropped in review"] == 1 and s.review_pending == []
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'pretrained = "tiny-random"\noutput_dir = "{tmp_path / "run"}"\nmax_train_steps = 1\n'
                   f'[[datasets]]\nmanifest = "{m}"\n')
    assert {mid} == {smp.key for smp in train_data.plan(train_config.load(cfg)).samples} & {big, mid, small}
    dedupe.run(m, workers=1)  # re-running dedupe keeps it so
    r = rows(m)
    assert r["a_mid"]["dup_of"] is None and r["a_small"]["dup_of"] == mid and r["a_big"]["dup_of"] == mid
    # a chosen keeper among the rest wins over pixels
    decide(m, {"key": small, "action": "keeper"})
    dedupe.run(m, workers=1)
    r = rows(m)
    assert r["a_small"]["dup_of"] is None and r["a_mid"]["dup_of"] == small
    # restored: the person's keeper stands, the restored copy is one of its duplicates
    decide(m, {"key": big, "action": "restore"})
    dedupe.run(m, workers=1)
    assert rows(m)["a_small"]["dup_of"] is None and rows(m)["a_big"]["dup_of"] == small
