"""Issue 26.3 (and 26.1's boxes): the decisions log on a full disk, with odd text and
hand-edited records."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from curate import manifest
from curate.common import decisions
from curate.dataset import crop
from curate.errors import CurateError
from curate.schema import MANIFEST_SCHEMA
from tests.small_disk import fill, small_disk


def tiny_manifest(folder: Path, sizes=((64, 48), (40, 40))) -> Path:
    rows = []
    for n, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (40 * n, 90, 200)).save(folder / f"i{n}.png")
        rows.append({"key": f"k{n}", "path": f"i{n}.png", "width": w, "height": h})
    names = ["key", "path", "width", "height"]
    schema = pa.schema([MANIFEST_SCHEMA.field(c) for c in names])
    return manifest.write(pa.Table.from_pylist(rows, schema=schema), folder / "m.parquet",
                          manifest.new_provenance())


def test_a_last_record_without_its_newline_is_kept_at_the_next_append(tmp_path):
    m = tmp_path / "m.parquet"
    decisions.append(m, [{"key": "a", "action": "drop", "reason": "blurry"}])
    log = decisions.sidecar(m)
    log.write_bytes(log.read_bytes().rstrip(b"\n"))  # an editor that strips the final newline
    decisions.append(m, [{"key": "b", "action": "drop"}])
    assert decisions.current(m).dropped == {"a": "blurry", "b": ""}
    assert not log.with_name(log.name + ".torn").exists()


def test_a_torn_last_line_is_reported_and_kept_aside(tmp_path, capsys):
    m = tmp_path / "m.parquet"
    decisions.append(m, [{"key": "a", "action": "drop"}])
    log = decisions.sidecar(m)
    with open(log, "ab") as f:
        f.write(b'{"key": "b", "action": "dr')  # a writer killed mid-line
    assert decisions.current(m).torn == '{"key": "b", "action": "dr'
    decisions.append(m, [{"key": "c", "action": "drop"}])
    assert "torn last line" in capsys.readouterr().err
    assert log.with_name(log.name + ".torn").read_text() == '{"key": "b", "action": "dr\n'
    assert decisions.current(m).dropped == {"a": "", "c": ""}
    assert all(json.loads(x) for x in log.read_text().splitlines())


def test_a_full_disk_writes_a_decision_whole_or_not_at_all(tmp_path):
    with small_disk(tmp_path / "disk") as disk:
        m = disk / "m.parquet"
        decisions.append(m, [{"key": "a", "action": "drop"}])
        before = decisions.sidecar(m).read_bytes()
        filler = fill(disk, leave=8192)
        big = {"key": "b", "action": "caption", "text": "1girl, " * 6000}  # ~42 KB: a short write
        with pytest.raises(CurateError, match="cannot write review decisions .*No space left"):
            decisions.append(m, [big])
        assert decisions.sidecar(m).read_bytes() == before  # nothing half written
        with pytest.raises(CurateError, match="No space left"):
            decisions.append(m, [big])
        filler.unlink()  # space freed: the next append is whole and starts on its own line
        decisions.append(m, [{"key": "c", "action": "drop"}, big])
        d = decisions.current(m)
        assert d.dropped == {"a": "", "c": ""} and d.captions() == {"b": big["text"]}


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c"])
def test_captions_with_unicode_line_separators_round_trip_export_and_apply(tmp_path, sep):
    m = tiny_manifest(tmp_path)
    text = f"1girl{sep}smile"
    decisions.append(m, [{"key": "k0", "action": "caption", "text": text}])
    out = tmp_path / "d.jsonl"
    assert decisions.export_file([m], out) == 1
    assert len(out.read_text(encoding="utf-8").splitlines()) == 1  # safe for every line reader
    other = tmp_path / "other"
    other.mkdir()
    m2 = tiny_manifest(other)
    assert decisions.apply_file([m2], out) == {str(m2): 1}
    assert decisions.current(m2).captions() == {"k0": text}


@pytest.mark.parametrize("record,message", [
    ({"key": "k0", "action": "caption", "set": {"caption": 5}}, "caption has the wrong type"),
    ({"key": "k0", "action": "split", "set": {"split": "yes"}}, "split has the wrong type"),
    ({"key": "k0", "action": "crop", "set": "box"}, "set is not a JSON object"),
    ({"key": "k0", "action": "keeper", "set": {"keeper": True}}, "keeper has the wrong type"),
    ({"key": "k0", "action": "x", "set": {"colour": 1}}, "unknown field 'colour'"),
    ({"key": "k0", "action": "crop", "set": {"box": [-5, 0, 30, 30]}}, "outside"),
    ({"key": "k0", "action": "crop", "set": {"box": [0, 0, 10 ** 9, 10 ** 9]}}, "outside"),
    ({"key": "k0", "action": "crop", "set": {"box": [0, 0, 2, 2]}}, "smaller than 16"),
    ({"key": "k0", "action": "crop", "set": {"box": [0, 0, 30.5, 30]}}, "whole pixels"),
])
def test_a_hand_edited_record_of_the_wrong_shape_is_one_line_naming_its_line(tmp_path, record, message):
    m = tiny_manifest(tmp_path)
    decisions.append(m, [{"key": "k1", "action": "drop"}])
    with open(decisions.sidecar(m), "a") as f:
        f.write(json.dumps(record) + "\n")
    with open(decisions.sidecar(m), "a") as f:  # not the last line: no torn write
        f.write(json.dumps({"key": "k1", "action": "seen", "set": {"seen": True}}) + "\n")
    with pytest.raises(CurateError, match=rf"m.parquet.decisions.jsonl:2: .*{message}"):
        decisions.current(m)
    with pytest.raises(CurateError, match=message):
        crop.run(m, workers=1)


def test_a_box_larger_than_its_image_stops_crop_naming_the_line(tmp_path):
    m = tiny_manifest(tmp_path)
    with open(decisions.sidecar(m), "a") as f:  # within the absolute bounds, past the 64x48 image
        f.write(json.dumps({"key": "k0", "action": "crop", "set": {"box": [0, 0, 640, 480]}}) + "\n")
    with pytest.raises(CurateError, match=r"decisions.jsonl:1: box \[0, 0, 640, 480\] is outside the 64x48 image of k0"):
        crop.run(m, workers=1)
    assert manifest.read(m)[0].column("crop").null_count == 2  # nothing cropped, nothing padded


def test_a_row_whose_width_lies_gets_its_box_checked_against_the_pixels(tmp_path):
    m = tiny_manifest(tmp_path)
    table, meta = manifest.read(m)
    manifest.write(manifest.with_column(table, "width", [640, 40]), m, meta)  # the row says 640 wide
    decisions.append(m, [{"key": "k0", "action": "crop", "box": [0, 0, 600, 48]}])
    crop.run(m, workers=1)
    row = manifest.read(m)[0].to_pylist()[0]
    assert "outside the 64x48 image" in row["error"] and row["crop"] is None


@pytest.mark.parametrize("box", [[0, 0, 3, 3], [10, 10, 10, 20], [-1, 0, 20, 20], [0, 0, 65, 48]])
def test_apply_refuses_bad_boxes_with_the_line(tmp_path, box):
    m = tiny_manifest(tmp_path)
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"key": "k0", "action": "crop", "box": box}) + "\n")
    with pytest.raises(CurateError, match=r"d.jsonl:1: box"):
        decisions.apply_file([m], f)
