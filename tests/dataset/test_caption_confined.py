"""Issue 26.1: nothing read from a manifest decides where caption writes."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from curate import manifest
from curate.cli import app
from tests.dataset.test_caption import captions_of, write_manifest


def row(post_id: int, **extra) -> dict:
    return {"key": f"danbooru/{post_id}", "post_id": post_id, "subset": "main",
            "tags_general": ["1girl", "smile"], "tags_character": [], "tags_copyright": [],
            "tags_artist": [], "tags_meta": [], **extra}


@pytest.mark.parametrize("recorded", ["/", "..", "../victim", "ABSOLUTE"])
def test_a_manifest_naming_its_own_download_folder_outside_gets_no_txt_there(tmp_path, recorded):
    """A manifest sent by someone else records `download.images` (or `crop.out_dir`) as `/`,
    `..` or an absolute folder, and its rows' paths point into that folder: caption writes
    the captions into the manifest's own `<stem>.captions/` folder, never beside those
    images, and never replaces the victim's `.txt`."""
    ids = [6141385, 6141439]
    proj, victim = tmp_path / "proj", tmp_path / "victim"
    proj.mkdir()
    rows = [row(i, path=f"../victim/{i}.png") for i in ids]
    folder = str(victim) if recorded == "ABSOLUTE" else recorded
    meta = manifest.record_stage(manifest.new_provenance(), "download", images=folder)
    manifest.record_stage(meta, "crop", out_dir=folder)
    m = write_manifest(proj / "m.parquet", rows, meta)
    (victim / f"{ids[0]}.txt").write_text("the victim's own caption", encoding="utf-8")
    result = CliRunner().invoke(app, ["caption", str(m)])
    assert result.exit_code == 0, result.output
    assert (victim / f"{ids[0]}.txt").read_text(encoding="utf-8") == "the victim's own caption"
    assert not (victim / f"{ids[1]}.txt").exists()
    caps = captions_of(m)
    for i in ids:
        assert (proj / "m.captions" / f"danbooru_{i}.txt").read_text(encoding="utf-8") == caps[f"danbooru/{i}"]


def test_a_recorded_folder_inside_the_manifests_folder_still_counts(tmp_path):
    i = 6141385
    meta = manifest.record_stage(manifest.new_provenance(), "download", images=str(tmp_path / "dl"))
    m = write_manifest(tmp_path / "m.parquet", [row(i, path=f"dl/{i}.png")], meta)
    assert CliRunner().invoke(app, ["caption", str(m)]).exit_code == 0
    assert (tmp_path / "dl" / f"{i}.txt").read_text(encoding="utf-8") == captions_of(m)[f"danbooru/{i}"]
