"""Export stage: manifests -> a folder kohya sd-scripts trains from.

    DIR/dataset_config.toml       pass as `--dataset_config`; one [[datasets]] (so reg
                                  subsets regularize the training subsets beside them)
                                  with one [[datasets.subsets]] per training subset and
                                  one per reg manifest (its subsets interleaved, below)
    DIR/<manifest>/<subset>/      the images and a `.txt` caption beside each: a link to
                                  the original (named after the row key, so names never
                                  collide) when sd-scripts reads it as curate did, else a
                                  normalized copy (normalize.py: upright, alpha flattened,
                                  PNG; a JPEG under another name is linked as .jpg)
    DIR/<manifest>/reg/           a reg manifest's images, names prefixed with a seeded
                                  rank that interleaves its subsets in proportion: sd-scripts
                                  takes reg images in file-name order up to the training
                                  count, so that choice is a proportional seeded sample
    DIR/metadata.json             the fine-tune variant: {absolute image path:
    DIR/<manifest>/<subset>.json  {"caption": ..., "tags": ""}} for training rows only (no
    DIR/dataset_config_finetune.toml  reg in sd-scripts' fine-tune route); `tags` stays
                                  empty because sd-scripts appends it to `caption`
    DIR/.curate-export.json       what the last export wrote (files, and a content hash
                                  of each image's pixels and caption); a re-export removes
                                  what it no longer writes, nothing else, and sd-scripts'
                                  caches (`<stem>*.npz`, sd_caches.py) of images whose
                                  pixels (latents) or caption (TE outputs) changed
                                  (written atomically: a full disk never leaves it empty)
    DIR/.curate-export.journal    while an export runs: each file's name, noted before
                                  the file is made, so the re-run of a killed export
                                  removes only files it recorded, never the user's

    DIR/names.csv                 each exported file's original name and path (`file,key,
                                  original_name,original_path`)
    DIR/sdxl_train_args.toml      with --config: the sd-scripts arguments that reproduce the
                                  train config (sdxl_train.py --config_file; sd_args.py)

`--portable`: a folder that travels (copied to a GPU machine): real files (copies unless
`--link hardlink`), and every path in the configs, metadata and arguments relative to DIR,
which sd-scripts resolves against its working folder: run it from inside DIR.

A caption of several lines (a user's alternatives) is written whole where the subset
sets `enable_wildcard` (sd-scripts then picks a line per step), else its first line,
as sd-scripts reads it; the summary counts the captions that lost lines.

Only captioned rows with a readable image on disk and no `error`/`dup_of` are exported.

Values come from the train config (docs/design.md layout) when `--config` is given:
top-level `resolution`, `min_bucket_reso`, `max_bucket_reso`, `bucket_reso_steps`,
`enable_bucket`, `bucket_no_upscale`, `train_batch_size` (sd-scripts' `batch_size`)
go to the dataset, and keys the config leaves out take `curate train`'s defaults
(train_config.dataset_defaults), so both see the same buckets; each `[[datasets]]`
table (`manifest = ...`) gives its subsets any of sd-scripts' subset keys (SUBSET_KEYS
below). Without a config the recipe's values apply: 1024 px, buckets 256-4096 step 32,
batch 2; training manifests shuffle captions with tag dropout 0.1; reg manifests
(provenance kind "reg") get `is_reg = true` and `class_tokens` from their provenance.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from curate import manifest
from curate.common import changed, decisions, normalize, reg_balance, train_config
from curate.common.decode import ImageError
from curate.dataset import sd_args, sd_caches
from curate.errors import CurateError

MARKER = ".curate-export.json"
JOURNAL = ".curate-export.journal"
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
# curate train's own [[datasets]] keys: read, never handed to sd-scripts (an is_val manifest is
# held out of curate's training, so export leaves it out too)
CURATE_ONLY = {"is_val": bool, "validation_split": (int, float)}
DREAMBOOTH_ONLY = {"is_reg", "class_tokens", "cache_info"}  # not in a fine-tune subset
TRAIN_DEFAULTS = {"num_repeats": 1, "shuffle_caption": True, "keep_tokens": 0,
                  "caption_tag_dropout_rate": 0.1, "flip_aug": False}
REG_DEFAULTS = {"num_repeats": 1, "shuffle_caption": False, "keep_tokens": 0,
                "caption_tag_dropout_rate": 0.0, "flip_aug": False, "is_reg": True}


@dataclass
class Row:
    key: str
    image: Path
    caption: str
    form: normalize.Form
    subset: str = ""     # the manifest subset (reg folders hold several)
    original: str = ""   # the image's original path (source_path, else path) as the manifest has it


@dataclass
class Folder:
    path: Path
    values: dict
    rows: list
    is_reg: bool = False
    seed: str = ""
    merged: bool = False
    names: list = field(default_factory=list)  # (exported file, key, original path) for names.csv


@dataclass
class ExportSummary:
    out_dir: Path
    subsets: list = field(default_factory=list)  # (image_dir, images, is_reg)
    skipped: Counter = field(default_factory=Counter)
    normalized: Counter = field(default_factory=Counter)  # why -> files
    background: tuple = (255, 255, 255)
    reg_use: dict = field(default_factory=dict)  # manifest subset -> [used per epoch, available]
    train_samples: int = 0
    suggestion: str = ""
    removed: int = 0
    weighted_captions: bool = False  # captions carry `\(` escapes: sd-scripts needs --weighted_captions
    review_pending: list = field(default_factory=list)  # curate review boxes/text crop/caption have not applied
    caches_removed: int = 0     # sd-scripts .npz caches of changed images
    changed_images: int = 0     # exported before, and now with other pixels or another caption
    cache_record: bool = True   # the last export recorded contents (else every cache found is removed)
    lines_left_out: int = 0     # multi-line captions cut to their first line (no enable_wildcard)
    caches_kept: int = 0        # sd-scripts .npz caches left beside unchanged images
    portable: bool = False
    train_args: str = ""        # sdxl_train_args.toml written ("" none)
    train_notes: list = field(default_factory=list)

    def lines(self) -> list[str]:
        total = sum(n for _, n, _ in self.subsets)
        out = [f"exported {total} images in {len(self.subsets)} subsets to {self.out_dir}"]
        for image_dir, n, is_reg in self.subsets:
            out.append(f"  {image_dir}: {n}{' (reg)' if is_reg else ''}")
        for why, n in sorted(self.skipped.items()):
            out.append(f"  skipped {n}: {why}")
        if self.normalized:
            out.append(f"  normalized {sum(self.normalized.values())} so sd-scripts reads what curate saw: "
                       + ", ".join(f"{why} {n}" for why, n in sorted(self.normalized.items())))
            if any("transparency" in why for why in self.normalized):
                out.append("    (alpha flattened on #%02x%02x%02x, as the tagger saw it)" % self.background)
        if self.reg_use:
            use = ", ".join(f"{name or '(none)'} {u}/{n}" for name, (u, n) in self.reg_use.items())
            out.append(f"  sd-scripts will use reg images (the same ones each epoch, against "
                       f"{self.train_samples} training samples): {use}")
        if self.suggestion:
            out.append(f"  suggestion: {self.suggestion}")
        if self.subsets and all(is_reg for _, _, is_reg in self.subsets):
            out.append("  warning: only reg subsets; sd-scripts needs training images beside them")
        if self.removed:
            out.append(f"  removed {self.removed} files the previous export wrote")
        if self.lines_left_out:
            out.append(f"  {self.lines_left_out} captions have several lines (the user's alternatives): wrote the "
                       "first, as sd-scripts reads it; enable_wildcard = true in the subset's [[datasets]] keeps all")
        if self.caches_removed or self.caches_kept or self.changed_images:
            if not self.cache_record and self.caches_removed:
                why = "no record of what the last export wrote"
            elif self.changed_images:
                why = f"{self.changed_images} images changed pixels or caption"
            else:
                why = "no image or caption changed" if not self.caches_removed else "their images left the export"
            out.append(f"  sd-scripts caches (.npz): removed {self.caches_removed} that no longer fit, "
                       f"kept {self.caches_kept} ({why})")
        out += [f"  warning: {note}" for note in self.review_pending]
        flag = " --weighted_captions" if self.weighted_captions else ""
        out.append("  names.csv: the original file name of each exported image")
        out += [f"  note: {n}" for n in self.train_notes]
        where = (lambda name: name) if self.portable else (lambda name: self.out_dir / name)  # noqa: E731
        if self.portable:
            out.append(f"portable: paths relative to {self.out_dir.name}/, real files; copy the folder and run "
                       f"sd-scripts from inside it (cd {self.out_dir.name})")
        if self.train_args:
            out.append(f"sd-scripts: accelerate launch sdxl_train.py --config_file {where(self.train_args)}")
        else:
            out.append(f"sd-scripts: --dataset_config {where('dataset_config.toml')}{flag}")
        out.append(f"fine-tune route: --dataset_config {where('dataset_config_finetune.toml')} "
                   f"--cache_latents{flag} (metadata.json, training rows only)")
        return out


# --- train config ------------------------------------------------------------------


def load_train_config(path: str | Path | None) -> tuple[dict, dict[Path, dict]]:
    """(dataset-level values, {resolved manifest path: subset values}) from a train config.

    Keys the config leaves out take `curate train`'s defaults, so both make the same buckets."""
    if path is None:
        return dict(RECIPE_DATASET), {}
    path = Path(path)
    doc = train_config.canonical(train_config.read_toml(path), path)  # as `curate train` reads it
    for key in doc:  # a typo would silently give other buckets than `curate train` (which refuses it)
        if key not in train_config._TYPES:
            raise CurateError(f"{path}: unknown key {key!r}" + train_config._hint(key))
    defaults = train_config.dataset_defaults()
    dataset = {DATASET_KEYS[key][0]: value for key, value in defaults.items()}
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
            if key not in SUBSET_KEYS and key not in CURATE_ONLY:
                raise CurateError(f"{where}: unknown key {key!r}")
            values[key] = _typed(value, {**SUBSET_KEYS, **CURATE_ONLY}[key], f"{where}: {key}")
        if values.get("num_repeats", 1) < 1 or values.get("keep_tokens", 0) < 0:
            raise CurateError(f"{where}: num_repeats must be >= 1 and keep_tokens >= 0")
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
        link: str = "symlink", portable: bool = False) -> ExportSummary:
    """`curate export --kohya DIR`: write the dataset folder, config and metadata."""
    if link not in LINK_MODES:
        raise CurateError(f"--link must be one of {', '.join(LINK_MODES)}")
    if portable and link == "symlink":
        link = "copy"  # a link points back to this machine's files; a hardlink is a real file
    dataset, per_manifest = load_train_config(config_path)
    train = _train_config(config_path)
    paths = [Path(m).resolve() for m in manifests] or list(per_manifest)
    if not paths:
        raise CurateError("no manifests: name them, or give a train config with [[datasets]]")
    out_dir = Path(out_dir).resolve()
    previous = _previous_files(out_dir)
    content, previous_content = {}, _previous_content(out_dir)
    summary = ExportSummary(out_dir, background=normalize.check_background(), portable=portable)
    # normalized copies from the last export are reused only if made on the same background
    reusable = previous if _previous_background(out_dir) == list(summary.background) else set()
    plan: list[Folder] = []
    weighted: set[bool] = set()  # sd-scripts' weighted_captions is one flag for the whole run
    used_names: set[str] = set()
    loaded = {path: (*manifest.read(path), decisions.current(path)) for path in dict.fromkeys(paths)}
    losers = decisions.cross_losers([(t, d) for t, _, d in loaded.values()])
    for path, (table, meta, review) in loaded.items():
        table = review.applied(table)  # a person's drops and keepers win
        note = decisions.pending_note(review, table, path)
        if note:
            summary.review_pending.append(note)
        is_reg = meta.get("kind") == "reg"
        base = dict(REG_DEFAULTS if is_reg else TRAIN_DEFAULTS)
        if is_reg and meta.get("class_token"):
            base["class_tokens"] = str(meta["class_token"])
        base.update(per_manifest.get(path, {}))
        base.pop("validation_split", None)
        if base.pop("is_val", False):
            summary.skipped["held out for validation (is_val)"] += table.num_rows
            continue
        separators = meta.get("stages", {}).get("caption", {}).get("keep_separators", {})
        escaped = meta.get("stages", {}).get("caption", {}).get("escaped", {}) or {}
        name = _unique(_safe_name(path.stem), used_names)
        folder_names: set[str] = set()
        folders: list[Folder] = []
        for subset, rows in _eligible(table, path.parent, summary.skipped, review.dropped, losers).items():
            values = dict(base)
            if separators.get(subset) and "keep_tokens_separator" not in values:
                values["keep_tokens_separator"] = separators[subset]
            if escaped.get(subset) or any("(" in r.caption or ")" in r.caption for r in rows):  # else either way
                weighted.add(bool(escaped.get(subset)))
            folder = Folder(out_dir / name / _unique(_safe_name(subset or "default"), folder_names),
                            values, rows, bool(values.get("is_reg")), f"{meta.get('seed', 0)}:{name}")
            merged = next((f for f in folders if f.is_reg and folder.is_reg and f.values == values), None)
            if merged:  # reg subsets with the same settings share one interleaved folder
                if not merged.merged:
                    merged.path, merged.merged = out_dir / name / _unique("reg", folder_names), True
                merged.rows += rows
            else:
                folders.append(folder)
        plan += folders
    if not plan:
        raise CurateError("nothing to export: no captioned rows with images (run curate caption first)")
    if len(weighted) > 1:
        raise CurateError("some captions carry escape_parentheses escapes and some do not; sd-scripts' "
                          "--weighted_captions is one flag for the run: caption them alike")
    summary.weighted_captions = weighted == {True}
    _predict_reg_use(plan, summary)

    done = False
    try:
        if not (out_dir / MARKER).is_file():  # claim the folder before the first file
            out_dir.mkdir(parents=True, exist_ok=True)
            _write_marker(out_dir, {"files": [], "claimed": True, "journal": True})
        written = _Journal(out_dir / JOURNAL)  # after a kill -9 the re-run knows what was ours
    except OSError as exc:
        raise CurateError(f"cannot write the export folder {out_dir}: {exc.strerror or exc}") from None
    try:
        _write(plan, out_dir, dataset, link, summary, written, reusable, content, previous_content)
        _write_extras(plan, out_dir, train, summary, written)
        done = True
    except OSError as exc:  # disk full, a file in a folder's place, ...: what was written is recorded
        where = f" ({exc.filename})" if exc.filename else ""
        raise CurateError(f"export to {out_dir} stopped: {exc.strerror or exc}{where}; "
                          "fix it and run again (the re-run replaces this one's files)") from None
    finally:  # a failed export still records what it wrote, so the next one can clean up
        record = set(written) if done else previous | written
        contents = content if done else {**(previous_content or {}), **content}
        written.close()
        try:
            if out_dir.is_dir():
                _write_marker(out_dir, {"files": sorted(record), "background": summary.background,
                                        "content": contents})
                (out_dir / JOURNAL).unlink(missing_ok=True)  # the marker holds it all now
        except OSError as exc:  # (the journal stays: the re-run still knows)
            if done:
                raise CurateError(f"cannot write {out_dir / MARKER}: {exc.strerror or exc}; "
                                  "free some space and run again") from None
    for rel in previous - written:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:  # the marker is a file anyone can edit
            continue
        target = out_dir / rel
        if target.is_symlink() or target.is_file():
            target.unlink()
            summary.removed += 1
            for cache in sd_caches.caches_of(target):  # a dropped image's caches go with it
                cache.unlink()
                summary.caches_removed += 1
                summary.caches_kept -= any(cache.parent == f.path for f in plan)  # counted as kept in _write
    _remove_empty_dirs(out_dir)
    return summary


def _eligible(table, root: Path, skipped: Counter, dropped=(), losers=()) -> dict[str, list[Row]]:
    """{subset: [Row]} for rows sd-scripts can train on, each with how to hand it over."""
    out: dict[str, list] = {}
    cols = table.select(["key", "subset", "path", "error", "dup_of", "caption", "source_path"]).to_pylist()
    replaced = changed.changed_keys(table, root)  # new pixels under old facts: not shipped
    for row in cols:
        if row["key"] in dropped:
            skipped["dropped in review"] += 1
        elif row["key"] in replaced:
            skipped[f"{changed.REASON} (run curate ingest again)"] += 1
        elif row["key"] in losers:
            skipped["duplicate (review chose the copy in another manifest)"] += 1
        elif row["error"]:
            skipped["error set"] += 1
        elif row["dup_of"]:
            skipped["duplicate"] += 1
        elif not row["caption"]:
            skipped["no caption"] += 1
        elif not row["path"] or not (root / row["path"]).is_file():
            skipped["no image on disk"] += 1
        else:
            try:
                form = normalize.decide(root / row["path"])
            except ImageError as exc:
                skipped[f"unreadable image ({str(exc).split(':')[0]})"] += 1
                continue
            subset = row["subset"] or ""
            out.setdefault(subset, []).append(Row(row["key"], root / row["path"], row["caption"], form, subset,
                                                  row.get("source_path") or row["path"]))
    return out


def _reg_order(folder: Folder) -> list[Row]:
    """The folder's rows in the interleaved, seeded order their rank prefixes give them."""
    groups: dict[str, list[Row]] = {}
    for row in folder.rows:
        groups.setdefault(row.subset, []).append(row)
    lists = list(groups.values())
    return [lists[g][i] for g, i in reg_balance.interleave([len(x) for x in lists], folder.seed)]


def _predict_reg_use(plan: list[Folder], summary: ExportSummary) -> None:
    """sd-scripts' rule over the layout this export writes: reg use per manifest subset."""
    for folder in plan:
        if folder.is_reg:
            for row in folder.rows:  # listed in manifest order
                summary.reg_use.setdefault(row.subset, [0, 0])
            folder.rows = _reg_order(folder)
    train = sum(len(f.rows) * f.values.get("num_repeats", 1) for f in plan if not f.is_reg)
    reg_rows = [(row, f.values.get("num_repeats", 1)) for f in plan if f.is_reg for row in f.rows]
    if not reg_rows:
        return
    summary.train_samples = train
    use = reg_balance.sd_scripts_use(train, [r for _, r in reg_rows])
    for (row, _), n in zip(reg_rows, use):
        counts = summary.reg_use[row.subset]
        counts[0] += n > 0
        counts[1] += 1
    if any(u < n for u, n in summary.reg_use.values()):
        train_images = sum(len(f.rows) for f in plan if not f.is_reg)
        needed = math.ceil(len(reg_rows) / max(train_images, 1))
        unused = [name or "(none)" for name, (u, _) in summary.reg_use.items() if not u]
        what = f"reg subset {', '.join(unused)} would go unused" if unused else "some reg images go unused"
        summary.suggestion = (f"{what}; num_repeats = {needed} on the training subsets (in the train "
                              f"config's [[datasets]]) lets sd-scripts use every reg image each epoch")


def _write(plan: list[Folder], out_dir: Path, dataset: dict, link: str, summary: ExportSummary,
           written: set[str], reusable: set[str], content: dict | None = None,
           previous_content: dict | None = None) -> None:
    """Lay out images + captions, then the TOMLs and metadata; note each file in `written`."""
    import tomli_w

    subsets, finetune, metadata = [], [], {}
    portable = summary.portable
    where = (lambda p: p.relative_to(out_dir).as_posix()) if portable else str  # noqa: E731
    for folder in plan:
        folder.path.mkdir(parents=True, exist_ok=True)
        stems: set[str] = set()
        width = len(str(len(folder.rows)))
        subset_metadata = {}
        for rank, row in enumerate(folder.rows):
            stem = _safe_name(row.key)
            if folder.is_reg:  # file-name order is the order sd-scripts takes reg images in
                stem = f"{rank:0{width}d}_{stem}"
            target = folder.path / (_unique(stem, stems) + row.form.ext)
            rel = str(target.relative_to(out_dir))
            caption_file = target.with_suffix(".txt")
            written.add(rel)  # noted before they are made (a killed export's re-run knows them)
            written.add(str(caption_file.relative_to(out_dir)))
            if row.form.copy:
                if not (rel in reusable and _current(target, row.image)):
                    _clear(target)
                    normalize.write_png(row.image, target)
                    os.utime(target, ns=(row.image.stat().st_atime_ns, row.image.stat().st_mtime_ns))
            else:
                _place(row.image.resolve(), target, link)
            if row.form.why:
                summary.normalized[row.form.why] += 1
            caption = _caption_text(row.caption, folder.values, summary)
            _drop_stale_caches(target, rel, row.image, caption, content, previous_content, summary)
            caption_file.write_text(caption, encoding="utf-8", newline="")
            if not folder.is_reg:  # sd-scripts' fine-tune route has no reg images (relative keys: to image_dir)
                # with enable_wildcard sd-scripts appends `separator + tags` to every line when
                # `tags` is there at all (an empty one leaves a trailing comma): then none
                entry = {"caption": caption} if folder.values.get("enable_wildcard") else {"caption": caption, "tags": ""}
                subset_metadata[target.name if portable else str(target)] = entry
                metadata[where(target)] = entry
            folder.names.append((rel, row.key, row.original))
        summary.caches_kept += sum(1 for _ in folder.path.glob("*.npz"))
        subsets.append({"image_dir": where(folder.path), **folder.values})
        if not folder.is_reg:
            meta_file = folder.path.with_name(folder.path.name + ".json")
            _write_text(meta_file, json.dumps(subset_metadata, indent=1, ensure_ascii=False), out_dir, written)
            finetune.append({"image_dir": where(folder.path), "metadata_file": where(meta_file),
                             **{k: v for k, v in folder.values.items() if k not in DREAMBOOTH_ONLY}})
        summary.subsets.append((str(folder.path.relative_to(out_dir)), len(folder.rows), folder.is_reg))
    config = {"general": {"caption_extension": ".txt"}, "datasets": [{**dataset, "subsets": subsets}]}
    flag = " --weighted_captions (the captions carry \\( escapes)" if summary.weighted_captions else ""
    inside = " (from inside this folder: the paths are relative)" if portable else ""
    header = f"# written by curate export; train with sd-scripts --dataset_config <this file>{flag}{inside}\n"
    _write_text(out_dir / "dataset_config.toml", header + tomli_w.dumps(config), out_dir, written)
    if finetune:
        header = ("# written by curate export: sd-scripts' fine-tune route (metadata files, training rows "
                  f"only); train with --dataset_config <this file> --cache_latents{flag}\n")
        _write_text(out_dir / "dataset_config_finetune.toml",
                    header + tomli_w.dumps({"datasets": [{**dataset, "subsets": finetune}]}), out_dir, written)
    _write_text(out_dir / "metadata.json", json.dumps(metadata, indent=1, ensure_ascii=False), out_dir, written)


def _train_config(config_path):
    """The train config as `curate train` reads it, for sdxl_train_args.toml (None: no config,
    or one `curate train` would refuse: export still writes the dataset)."""
    if config_path is None:
        return None
    try:
        cfg = train_config.load(config_path)
    except CurateError as exc:
        return str(exc)
    # the model as the user wrote it (a hub id stays one; a local file is the GPU machine's to have)
    raw = train_config.canonical(train_config.read_toml(config_path), Path(config_path))
    cfg.pretrained = raw.get("pretrained", cfg.pretrained)
    return cfg


def _write_extras(plan: list[Folder], out_dir: Path, train, summary: ExportSummary, written: set[str]) -> None:
    """names.csv, and with a train config sdxl_train_args.toml (+ its sample prompts file)."""
    import csv
    import io

    import tomli_w

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "key", "original_name", "original_path"])
    for folder in plan:
        for rel, key, original in folder.names:
            w.writerow([Path(rel).as_posix(), key, Path(original).name, original])
    _write_text(out_dir / "names.csv", buf.getvalue(), out_dir, written)
    if isinstance(train, str):
        summary.train_notes.append(f"no sdxl_train_args.toml: the train config is incomplete for a run ({train})")
        return
    if train is None:
        return
    where = (lambda name: name) if summary.portable else (lambda name: str(out_dir / name))  # noqa: E731
    prompts = sd_args.prompt_lines(train)
    if prompts:
        _write_text(out_dir / "sample_prompts.txt", prompts, out_dir, written)
    args, notes = sd_args.sdxl_train_args(train, where("dataset_config.toml"),
                                          where("sample_prompts.txt") if prompts else None)
    if summary.weighted_captions:
        args["weighted_captions"] = True
    summary.train_notes += notes
    header = ("# written by curate export from " + str(train.source) + ": sd-scripts' arguments for the same run;\n"
              "# accelerate launch sdxl_train.py --config_file <this file>"
              + (" (from inside this folder: the paths are relative)" if summary.portable else "") + "\n")
    _write_text(out_dir / "sdxl_train_args.toml", header + tomli_w.dumps(args), out_dir, written)
    summary.train_args = "sdxl_train_args.toml"


def _caption_text(caption: str, values: dict, summary: ExportSummary) -> str:
    """The caption as sd-scripts should read it: every line with enable_wildcard, else the first."""
    if "\n" in caption and not values.get("enable_wildcard"):
        summary.lines_left_out += 1
        return caption.split("\n", 1)[0]
    return caption


def _drop_stale_caches(target: Path, rel: str, source: Path, caption: str, content: dict | None,
                       previous: dict | None, summary: ExportSummary) -> None:
    """Record this file's pixels and caption; remove sd-scripts' caches the change made stale."""
    if content is None:
        return
    old = (previous or {}).get(rel)
    pixels, fp = sd_caches.pixels_hash(source, old)
    new = content[rel] = {"pixels": pixels, "caption": sd_caches.text_hash(caption), "source": fp}
    if old is not None and (old.get("pixels"), old.get("caption")) != (new["pixels"], new["caption"]):
        summary.changed_images += 1
    summary.cache_record = summary.cache_record and previous is not None
    for cache in sd_caches.stale(target, old if previous is not None else None, new):
        cache.unlink()
        summary.caches_removed += 1


def _previous_content(out_dir: Path) -> dict | None:
    """{exported image: {pixels, caption, source}} of the last export; None: not recorded."""
    try:
        content = json.loads((out_dir / MARKER).read_text(encoding="utf-8")).get("content")
    except (OSError, ValueError, AttributeError):
        return None
    return content if isinstance(content, dict) else None


def _write_text(path: Path, text: str, out_dir: Path, written: set[str]) -> None:
    written.add(str(path.relative_to(out_dir)))  # noted first: see _Journal
    path.write_text(text, encoding="utf-8")


class _Journal(set):
    """The set of files this export writes; each is noted in DIR/.curate-export.journal
    before it is made (a killed export's re-run removes only those)."""

    def __init__(self, path: Path):
        super().__init__()
        self._f = open(path, "a", encoding="utf-8")

    def add(self, rel: str) -> None:
        if rel not in self:
            self._f.write(json.dumps(rel) + "\n")
            self._f.flush()  # in the kernel's hands: a kill -9 of this process loses nothing
        super().add(rel)

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass


def _write_marker(out_dir: Path, record: dict) -> None:
    """The marker, atomically: a full disk leaves the old one, never an empty file."""
    tmp = out_dir / (MARKER + ".part")
    try:
        tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
        os.replace(tmp, out_dir / MARKER)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise


def _journal_files(out_dir: Path) -> set[str]:
    """Files a killed or failed export noted before making them (a torn last line: skipped)."""
    out = set()
    try:
        lines = (out_dir / JOURNAL).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError):
        return out
    for line in lines:
        try:
            rel = json.loads(line)
        except ValueError:
            continue
        if isinstance(rel, str):
            out.add(rel)
    return out


def _current(target: Path, source: Path) -> bool:
    """A normalized copy from an earlier export of this very source file (it carries its mtime)."""
    try:
        return (not target.is_symlink() and target.is_file()
                and target.stat().st_mtime_ns == source.stat().st_mtime_ns)
    except OSError:
        return False


def _previous_background(out_dir: Path):
    try:
        return json.loads((out_dir / MARKER).read_text(encoding="utf-8")).get("background")
    except (OSError, ValueError, AttributeError):
        return None


def _clear(target: Path) -> None:
    if target.is_symlink() or target.exists():
        target.unlink()


def _place(source: Path, target: Path, link: str) -> None:
    _clear(target)
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
            record = json.loads(marker.read_text(encoding="utf-8"))
            if record.get("claimed") and not record.get("journal"):  # an older curate's claim: all here is its
                return {str(p.relative_to(out_dir)) for p in out_dir.rglob("*")
                        if (p.is_symlink() or p.is_file()) and p.name not in (MARKER, JOURNAL)}
            return set(record["files"]) | _journal_files(out_dir)  # a killed run's files were journaled
        except (ValueError, KeyError, TypeError, AttributeError):
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
