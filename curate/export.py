"""Export stage: manifests -> a folder kohya sd-scripts trains from.

    DIR/dataset_config.toml       pass as `--dataset_config`; one [[datasets]] (so reg
                                  subsets regularize the training subsets beside them)
                                  with one [[datasets.subsets]] per manifest subset
    DIR/<manifest>/<subset>/      the images (links named after the row key, so names
                                  never collide) and a `.txt` caption beside each
    DIR/metadata.json             the fine-tune variant: {absolute image path:
                                  {"caption": ..., "tags": ""}}; `tags` stays empty
                                  because sd-scripts appends it to `caption`, and the
                                  caption already holds the tags
    DIR/.curate-export.json       what the last export wrote; a re-export removes
                                  what it no longer writes, nothing else

Only captioned rows with an image on disk and no `error`/`dup_of` are exported.

Values come from the train config (DESIGN.md layout) when `--config` is given:
top-level `resolution`, `min_bucket_reso`, `max_bucket_reso`, `bucket_reso_steps`,
`enable_bucket`, `bucket_no_upscale`, `train_batch_size` (sd-scripts' `batch_size`)
go to the dataset; each `[[datasets]]` table (`manifest = ...`) gives its subsets
any of sd-scripts' subset keys (SUBSET_KEYS below). Without a config the recipe's
values apply: 1024 px, buckets 256-4096 step 32, batch 2; training manifests
shuffle captions with tag dropout 0.1; reg manifests (provenance kind "reg") get
`is_reg = true` and `class_tokens` from their provenance.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import manifest, train_config
from .errors import CurateError

MARKER = ".curate-export.json"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # what sd-scripts globs
LINK_MODES = ("symlink", "hardlink", "copy")

# sd-scripts dataset keys (docs/config_README): train-config name -> (config name, type)
DATASET_KEYS = {
    "resolution": ("resolution", (int, list)),
    "train_batch_size": ("batch_size", int),
    "enable_bucket": ("enable_bucket", bool),
    "bucket_no_upscale": ("bucket_no_upscale", bool),
    "bucket_reso_steps": ("bucket_reso_steps", int),
    "min_bucket_reso": ("min_bucket_reso", int),
    "max_bucket_reso": ("max_bucket_reso", int),
}
RECIPE_DATASET = {"resolution": 1024, "batch_size": 2, "enable_bucket": True,
                  "min_bucket_reso": 256, "max_bucket_reso": 4096, "bucket_reso_steps": 32}
# sd-scripts keys a [[datasets.subsets]] entry may carry (DreamBooth-style subsets)
SUBSET_KEYS = {
    "num_repeats": int, "shuffle_caption": bool, "keep_tokens": int,
    "keep_tokens_separator": str, "caption_tag_dropout_rate": (int, float),
    "caption_dropout_rate": (int, float), "caption_dropout_every_n_epochs": int,
    "flip_aug": bool, "color_aug": bool, "random_crop": bool, "face_crop_aug_range": list,
    "caption_prefix": str, "caption_suffix": str, "caption_separator": str,
    "secondary_separator": str, "enable_wildcard": bool, "is_reg": bool,
    "class_tokens": str, "cache_info": bool, "resize_interpolation": str,
}
TRAIN_DEFAULTS = {"num_repeats": 1, "shuffle_caption": True, "keep_tokens": 0,
                  "caption_tag_dropout_rate": 0.1, "flip_aug": False}
REG_DEFAULTS = {"num_repeats": 1, "shuffle_caption": False, "keep_tokens": 0,
                "caption_tag_dropout_rate": 0.0, "flip_aug": False, "is_reg": True}


@dataclass
class ExportSummary:
    out_dir: Path
    subsets: list = field(default_factory=list)  # (image_dir, images, is_reg)
    skipped: Counter = field(default_factory=Counter)
    removed: int = 0
    weighted_captions: bool = False  # captions carry `\(` escapes: sd-scripts needs --weighted_captions

    def lines(self) -> list[str]:
        total = sum(n for _, n, _ in self.subsets)
        out = [f"exported {total} images in {len(self.subsets)} subsets to {self.out_dir}"]
        for image_dir, n, is_reg in self.subsets:
            out.append(f"  {image_dir}: {n}{' (reg)' if is_reg else ''}")
        for why, n in sorted(self.skipped.items()):
            out.append(f"  skipped {n}: {why}")
        if self.subsets and all(is_reg for _, _, is_reg in self.subsets):
            out.append("  warning: only reg subsets; sd-scripts needs training images beside them")
        if self.removed:
            out.append(f"  removed {self.removed} files the previous export wrote")
        out.append(f"sd-scripts: --dataset_config {self.out_dir / 'dataset_config.toml'}"
                   + (" --weighted_captions" if self.weighted_captions else ""))
        out.append(f"fine-tune metadata: {self.out_dir / 'metadata.json'}")
        return out


# --- train config ------------------------------------------------------------------


def load_train_config(path: str | Path | None) -> tuple[dict, dict[Path, dict]]:
    """(dataset-level values, {resolved manifest path: subset values}) from a train config."""
    if path is None:
        return dict(RECIPE_DATASET), {}
    path = Path(path)
    doc = train_config.read_toml(path)  # parsed and paths resolved as `curate train` does
    dataset = dict(RECIPE_DATASET)
    for key, (name, typ) in DATASET_KEYS.items():
        if key in doc:
            dataset[name] = _typed(doc[key], typ, f"{path}: {key}")
    entries = doc.get("datasets", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise CurateError(f"{path}: 'datasets' must be [[datasets]] tables")
    per_manifest: dict[Path, dict] = {}
    for i, entry in enumerate(entries, 1):
        where = f"{path}: [[datasets]] #{i}"
        if not isinstance(entry.get("manifest"), str):
            raise CurateError(f"{where}: needs manifest = \"path/to/manifest.parquet\"")
        values = {}
        for key, value in entry.items():
            if key == "manifest":
                continue
            if key in DATASET_KEYS or key in RECIPE_DATASET:
                raise CurateError(f"{where}: {key} is a top-level key of the train config")
            if key not in SUBSET_KEYS:
                raise CurateError(f"{where}: unknown key {key!r}")
            values[key] = _typed(value, SUBSET_KEYS[key], f"{where}: {key}")
        per_manifest[train_config.resolve_manifest(entry["manifest"], path)] = values
    _check_buckets(dataset, path)
    return dataset, per_manifest


def _typed(value, typ, where: str):
    ok = isinstance(value, typ) and not (isinstance(value, bool) and typ in (int, (int, float)))
    if not ok:
        raise CurateError(f"{where}: unexpected value {value!r}")
    return value


def _check_buckets(dataset: dict, path: Path) -> None:
    step = dataset["bucket_reso_steps"]
    for key in ("min_bucket_reso", "max_bucket_reso"):
        if step <= 0 or dataset[key] % step:
            raise CurateError(f"{path}: {key} must be divisible by bucket_reso_steps ({step})")
    res = dataset["resolution"]
    if isinstance(res, list) and (len(res) != 2 or not all(isinstance(r, int) for r in res)):
        raise CurateError(f"{path}: resolution must be a number or [width, height]")


# --- export --------------------------------------------------------------------------


def run(manifests: list[str | Path], out_dir: str | Path, config_path: str | Path | None = None,
        link: str = "symlink") -> ExportSummary:
    """`curate export --kohya DIR`: write the dataset folder, config and metadata."""
    if link not in LINK_MODES:
        raise CurateError(f"--link must be one of {', '.join(LINK_MODES)}")
    dataset, per_manifest = load_train_config(config_path)
    paths = [Path(m).resolve() for m in manifests] or list(per_manifest)
    if not paths:
        raise CurateError("no manifests: name them, or give a train config with [[datasets]]")
    out_dir = Path(out_dir).resolve()
    previous = _previous_files(out_dir)
    summary = ExportSummary(out_dir)
    plan = []  # (subset dir, subset values, [(key, image, caption)])
    weighted: set[bool] = set()  # sd-scripts' weighted_captions is one flag for the whole run
    used_names: set[str] = set()
    for path in dict.fromkeys(paths):
        table, meta = manifest.read(path)
        is_reg = meta.get("kind") == "reg"
        base = dict(REG_DEFAULTS if is_reg else TRAIN_DEFAULTS)
        if is_reg and meta.get("class_token"):
            base["class_tokens"] = str(meta["class_token"])
        base.update(per_manifest.get(path, {}))
        separators = meta.get("stages", {}).get("caption", {}).get("keep_separators", {})
        escaped = meta.get("stages", {}).get("caption", {}).get("escaped", {}) or {}
        name = _unique(_safe_name(path.stem), used_names)
        subset_names: set[str] = set()
        for subset, rows in _eligible(table, path.parent, summary.skipped).items():
            values = dict(base)
            if separators.get(subset) and "keep_tokens_separator" not in values:
                values["keep_tokens_separator"] = separators[subset]
            folder = _unique(_safe_name(subset or "default"), subset_names)
            if escaped.get(subset) or any("(" in c or ")" in c for *_, c in rows):  # else either way
                weighted.add(bool(escaped.get(subset)))
            plan.append((out_dir / name / folder, values, rows))
    if not plan:
        raise CurateError("nothing to export: no captioned rows with images (run curate caption first)")
    if len(weighted) > 1:
        raise CurateError("some captions carry escape_parentheses escapes and some do not; sd-scripts' "
                          "--weighted_captions is one flag for the run: caption them alike")
    summary.weighted_captions = weighted == {True}

    written: set[str] = set()
    done = False
    try:
        _write(plan, out_dir, dataset, link, summary, written, summary.weighted_captions)
        done = True
    finally:  # a failed export still records what it wrote, so the next one can clean up
        record = written if done else previous | written
        if out_dir.is_dir():
            (out_dir / MARKER).write_text(json.dumps({"files": sorted(record)}, indent=1), encoding="utf-8")
    for rel in previous - written:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:  # the marker is a file anyone can edit
            continue
        target = out_dir / rel
        if target.is_symlink() or target.is_file():
            target.unlink()
            summary.removed += 1
    _remove_empty_dirs(out_dir)
    return summary


def _eligible(table, root: Path, skipped: Counter) -> dict[str, list]:
    """{subset: [(key, image path, caption)]} for rows sd-scripts can train on."""
    out: dict[str, list] = {}
    cols = table.select(["key", "subset", "path", "error", "dup_of", "caption"]).to_pylist()
    for row in cols:
        if row["error"]:
            skipped["error set"] += 1
        elif row["dup_of"]:
            skipped["duplicate"] += 1
        elif not row["caption"]:
            skipped["no caption"] += 1
        elif not row["path"] or not (root / row["path"]).is_file():
            skipped["no image on disk"] += 1
        elif Path(row["path"]).suffix.lower() not in IMAGE_EXTENSIONS:
            skipped[f"{Path(row['path']).suffix or 'no'} files, which sd-scripts does not read"] += 1
        else:
            out.setdefault(row["subset"] or "", []).append((row["key"], root / row["path"], row["caption"]))
    return out


def _write(plan, out_dir: Path, dataset: dict, link: str, summary: ExportSummary,
           written: set[str], weighted: bool = False) -> None:
    """Lay out images + captions, then the TOML and metadata; note each file in `written`."""
    import tomli_w

    subsets, metadata = [], {}
    for subset_dir, values, rows in plan:
        subset_dir.mkdir(parents=True, exist_ok=True)
        stems: set[str] = set()
        for key, image, caption in rows:
            target = subset_dir / (_unique(_safe_name(key), stems) + image.suffix.lower())
            _place(image.resolve(), target, link)
            caption_file = target.with_suffix(".txt")
            caption_file.write_text(caption, encoding="utf-8", newline="")
            written.add(str(target.relative_to(out_dir)))
            written.add(str(caption_file.relative_to(out_dir)))
            metadata[str(target)] = {"caption": caption, "tags": ""}
        subsets.append({"image_dir": str(subset_dir), **values})
        summary.subsets.append((str(subset_dir.relative_to(out_dir)), len(rows), values.get("is_reg", False)))
    config = {"general": {"caption_extension": ".txt"}, "datasets": [{**dataset, "subsets": subsets}]}
    header = ("# written by curate export; train with sd-scripts --dataset_config <this file>"
              + (" --weighted_captions (the captions carry \\( escapes)" if weighted else "") + "\n")
    (out_dir / "dataset_config.toml").write_text(header + tomli_w.dumps(config), encoding="utf-8")
    written.add("dataset_config.toml")
    (out_dir / "metadata.json").write_text(json.dumps(metadata, indent=1, ensure_ascii=False),
                                           encoding="utf-8")
    written.add("metadata.json")


def _place(source: Path, target: Path, link: str) -> None:
    if target.is_symlink() or target.exists():
        target.unlink()
    try:
        if link == "symlink":
            target.symlink_to(source)
        elif link == "hardlink":
            os.link(source, target)
        else:
            shutil.copy2(source, target)
    except OSError as exc:
        raise CurateError(f"cannot {link} {source} -> {target}: {exc.strerror}"
                          + (" (try --link copy)" if link != "copy" else "")) from None


def _previous_files(out_dir: Path) -> set[str]:
    """Files the last export wrote; refuse a non-empty folder curate did not write."""
    marker = out_dir / MARKER
    if marker.is_file():
        try:
            return set(json.loads(marker.read_text(encoding="utf-8"))["files"])
        except (ValueError, KeyError, TypeError):
            raise CurateError(f"{marker} is damaged; remove {out_dir} and export again") from None
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CurateError(f"{out_dir} is not empty and was not written by curate export")
    return set()


def _remove_empty_dirs(out_dir: Path) -> None:
    for folder in sorted((p for p in out_dir.rglob("*") if p.is_dir() and not p.is_symlink()),
                         key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "default"


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{name}-{n}"
    used.add(candidate)
    return candidate
