"""docs/commands.md is generated from the CLI; --help shows square brackets as text."""

from pathlib import Path

from typer.testing import CliRunner

from curate.cli import app
from curate.demo.run import REFERENCE, command_reference, reference_section

ROOT = Path(__file__).resolve().parents[2]


def test_the_command_reference_is_the_clis():
    text = (ROOT / REFERENCE).read_text(encoding="utf-8")
    _, body, _ = reference_section(text, REFERENCE)
    assert body == command_reference(), (
        f"{REFERENCE} differs from the CLI: run python -m curate.demo readme {REFERENCE}")


def test_help_keeps_text_in_square_brackets():
    """Rich markup used to eat `[ray]` and `[left, top, right, bottom]` (issue 25): Rich reads
    `[word]` as a style tag and drops it (Textualize/rich#2676; typer renders help through Rich,
    anaconda/anaconda-client#875 escaped each bracket; we turn the markup off instead)."""
    runner = CliRunner()
    crop = runner.invoke(app, ["crop", "--help"], terminal_width=200)
    assert crop.exit_code == 0 and "crop [left, top, right, bottom]" in crop.output
    dedupe = runner.invoke(app, ["dedupe", "--help"], terminal_width=200)
    assert "pip install 'curate[ray]'" in " ".join(dedupe.output.split())
    caption = runner.invoke(app, ["caption", "--help"], terminal_width=200)
    assert "[caption] table" in " ".join(caption.output.split()) and "\\[" not in caption.output
