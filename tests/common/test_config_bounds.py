"""Issue 26.1 and 26.6: a train config names plain files only, and config / query files
are bounded (size, depth, dotted keys) before tomllib parses them."""

from __future__ import annotations

import pytest

from curate.common import toml_bounds, train_config
from curate.errors import CurateError
from curate.metadata import query
from tests.common.test_train_config import DATASET, MINIMAL, write


@pytest.mark.parametrize("name", ["/tmp/evil", "../base_model", "a/b", "..", ".", "", "x\\y", "C:model",
                                  "line\nbreak", " padded"])
def test_output_name_must_be_a_plain_file_name_checked_at_load(tmp_path, name):
    text = MINIMAL + f"output_name = {toml_str(name)}\n" + DATASET
    with pytest.raises(CurateError, match="output_name must be a plain file name"):
        train_config.load(write(tmp_path, text))


def test_a_plain_output_name_loads(tmp_path):
    cfg = train_config.load(write(tmp_path, MINIMAL + 'output_name = "baxl-v3.1_final"\n' + DATASET))
    assert cfg.output_name == "baxl-v3.1_final"


def toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') + '"'


# Public reports: python-poetry/tomlkit PR #510 (nested arrays, inline tables and a dotted key
# `'a.'*10000 + 'a = 1'` crash the parser with RecursionError) and notatallshaw/nab PR #974
# (an integer over 4300 digits is a bare ValueError from tomllib/tomli, not a TOMLDecodeError).
@pytest.mark.parametrize("text,message", [
    ("x = " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than"),
    ("a." * 10000 + "a = 1\n", "dotted parts"),
    ("seed = " + "9" * 5000 + "\n", "not valid TOML|invalid TOML"),
    ("x = " + "{a = " * 2000 + "1" + "}" * 2000 + "\n", "nested deeper than"),
    ("a" + ".a" * 100_000 + " = 1\n", "dotted parts"),          # 200 KB dotted key: GBs in tomllib
    ("[" + ".".join(["t"] * 500) + "]\n", "dotted parts"),
    ("name = \"x\"\n" + "# padding\n" * 200_000, "too large"),
])
def test_toml_bombs_are_one_line_errors_before_parsing(tmp_path, text, message):
    with pytest.raises(CurateError, match=message):
        train_config.load(write(tmp_path, text))
    with pytest.raises(CurateError, match=message):
        query.parse(text, label="q.toml")


def test_ordinary_toml_passes_the_bounds():
    text = ('name = "x"\nrating = ["g", "s"]\nscore = { min = 1.5 }\n'
            'a.b.c = 1\nthresholds = [' + ", ".join(f"{i}.5" for i in range(200)) + ']\n'
            'when = 1979-05-27T07:32:00.999\ns = "dots . . . . in a string [[[["\n'
            "t = '''\n" + "[" * 100 + "\n'''\n")
    toml_bounds.check(text, "ok.toml")


def test_the_real_recipe_configs_pass():
    from tests.common.test_train_config import REPO

    for path in (REPO / "configs").glob("*.toml"):
        toml_bounds.check(path.read_text(encoding="utf-8"), str(path))
