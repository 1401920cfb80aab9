"""The package is laid out by the pipeline and its imports run one way: stage packages
use the root helpers and curate.common, never each other; the root helpers use only
each other; only the shells (cli, demo) may import anything."""

import ast
from pathlib import Path

import curate

PKG = Path(curate.__file__).parent
ROOT_HELPERS = {"errors", "pool", "engine", "http", "manifest", "schema", "__init__"}
STAGES = {"metadata", "images", "dataset", "train", "review", "report"}
SHELLS = {"cli", "__main__", "demo"}


def _floor(module: str) -> str:
    parts = module.split(".")[1:]
    head = parts[0] if parts else "__init__"
    if head in SHELLS:
        return "shell"
    if head == "common":
        return "common"
    if head in STAGES:
        return head
    assert head in ROOT_HELPERS, f"{module}: a new root module; put it in a floor"
    return "root"


def _imports(path: Path, module: str):
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target
            for a in node.names:  # `from curate import manifest` imports curate.manifest
                yield f"{target}.{a.name}"


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        yield path, module


def _existing(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PKG.parent / rel).with_suffix(".py").exists() or (PKG.parent / rel / "__init__.py").exists()


def test_imports_run_one_way():
    allowed = {"root": {"root"}, "common": {"root", "common"}, "shell": None}
    wrong = []
    for path, module in _modules():
        mine = _floor(module)
        for target in _imports(path, module):
            if not target.startswith("curate.") or not _existing(target):
                continue
            theirs = _floor(target)
            ok = allowed.get(mine, {"root", "common", mine})
            if ok is not None and theirs not in ok:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_every_stage_package_exists_with_its_stages():
    for name in ["metadata/sources/danbooru", "metadata/select", "images/download", "dataset/dedupe",
                 "dataset/crop", "dataset/tag", "dataset/caption", "dataset/export", "train/loop",
                 "review/server", "report/html", "common/decisions", "common/thumbs"]:
        assert (PKG / f"{name}.py").is_file(), name
    assert len(list(PKG.glob("*.py"))) <= 10, "the root holds the shared helpers and the CLI only"
