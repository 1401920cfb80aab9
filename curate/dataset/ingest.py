"""Local images (an official CG folder) -> manifest rows.

One row per image file found recursively: key `local/<sha256 prefix>` of the bytes,
width/height, `subset` = the ingest name, `path` and `source_path` relative to the
manifest's folder, `sha256` (extension column, reused by dedupe). A file Pillow
cannot decode becomes a row with `error`. Re-ingesting a grown folder keeps every
existing row as it is and adds only files whose `source_path` is new.

Symlinks: a row records the link's own path inside the folder (never its target),
so no later stage writes beside a file elsewhere. A link whose target lies outside
the folder is an error row unless `follow_external` (`--follow-external-links`); a
link loop or a dangling link is an error row too, and the rest is ingested. Linked
folders are not entered (a sidecar caption that links out of the image's folder is not read).

A user's caption beside an image (`<stem>.txt` or `<stem>.caption`, UTF-8 with or
without BOM) is read into `user_caption`, for new rows and again for existing ones (the
user may have written it since); the file itself is never changed. Every sidecar found
(`.txt`, `.caption`, and the extensions `caption_exts` adds, in that order) goes into
`user_sidecars` ([{ext, text}]): sd-scripts' fine-tune preparation leaves BLIP sentences
in `.caption` and WD14 tags in `.txt` beside one image, and the caption stage combines
them; `user_caption` is the first one (`--caption-ext` order). Lines stay lines (a
multi-line file holds alternatives: sd-scripts reads the first, or one at random with
`enable_wildcard`).

Housekeeping folders and files (NAS thumbnails `@eaDir`, recycle bins `#recycle`,
`$RECYCLE.BIN`, `.Trash-1000`, `System Volume Information`, `__MACOSX`, `Thumbs.db`,
`desktop.ini`, ...) are not the user's images: skipped like dot-folders and counted by
kind in the summary; `include_housekeeping` (`--include-housekeeping`) reads them.

Byte-identical copies keep a row each (dedupe marks them); the later copy's key is
the sha256 prefix of its bytes plus its relative path, so keys stay unique and stable.

An image replaced under the same name (size, or mtime and bytes, differ from what ingest
recorded in `source_size` / `source_mtime_ns`) is redone by the next ingest: its size and
hash are read again, and what later stages derived from the old pixels (crop box and
derived file, hashes, duplicate mark, tagger output, caption) is cleared for them to redo.
Until then export leaves such a row out and says so (curate.common.changed).
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from curate.common import changed
from curate.common.decode import OPEN_KINDS, ImageError, open_image, probe, sniff
from curate.common.digest import file_sha256
from curate.errors import CurateError
from curate.pool import UNFINISHED, PoolStopped, default_workers, parallel_map

SIDECARS = (".txt", ".caption")  # a user's caption beside the image (sd-scripts' two defaults)
SIDECAR_MAX_BYTES = 1 << 20     # a caption, not a book: bigger files are reported and left out
KEY_HEX = 16  # 64 bits of sha256: no accidental collision among millions of files
SKIP_SUFFIXES = {".parquet", ".part", ".txt", ".json", ".toml", ".caption", ".npz", ".db"}
# Folders and files an OS or a NAS keeps among the user's (lower-case name -> kind):
# Synology @eaDir thumbnails and #recycle / #snapshot, QNAP @Recycle / .@__thumb, Windows'
# recycle bin and restore points, macOS zip leftovers and Trash, freedesktop .Trash-<uid>
HOUSEKEEPING_DIRS = {"@eadir": "@eaDir", "#recycle": "#recycle", "#snapshot": "#snapshot",
                     "@recycle": "@Recycle", ".@__thumb": ".@__thumb", "$recycle.bin": "$RECYCLE.BIN",
                     "recycler": "$RECYCLE.BIN", "system volume information": "System Volume Information",
                     "__macosx": "__MACOSX", ".trashes": ".Trash", ".trash": ".Trash",
                     ".appledouble": ".AppleDouble", ".spotlight-v100": ".Spotlight-V100",
                     ".fseventsd": ".fseventsd"}
HOUSEKEEPING_FILES = {"thumbs.db": "Thumbs.db", "ehthumbs.db": "Thumbs.db", "desktop.ini": "desktop.ini",
                      ".ds_store": ".DS_Store"}


def housekeeping(name: str, is_dir: bool) -> str | None:
    """The kind of OS/NAS housekeeping entry `name` is (None: the user's own)."""
    low = name.lower()
    if is_dir:
        return "Trash-<uid>" if low.startswith(".trash-") else HOUSEKEEPING_DIRS.get(low)
    return HOUSEKEEPING_FILES.get(low)


@dataclass
class Summary:
    found: int = 0
    added: int = 0
    existing: int = 0
    failed: int = 0
    copies: int = 0
    not_images: int = 0
    missing: int = 0
    changed: int = 0   # replaced under the same name since the last ingest: redone
    rows: int = 0
    user_captions: int = 0
    errors: list = field(default_factory=list)
    housekeeping: Counter = field(default_factory=Counter)  # kind -> files skipped
    sidecars: Counter = field(default_factory=Counter)      # sidecar extension -> rows with one
    several_sidecars: int = 0                               # rows with more than one


def _looks_like_image(path: Path, known: set) -> bool:
    """By an extension Pillow knows; other names by their first bytes (never a Pillow open)."""
    suffix = path.suffix.lower()
    if path.name.startswith("."):  # .DS_Store, macOS "._x.jpg" resource forks
        return False
    if suffix in known:
        return True
    if suffix in SKIP_SUFFIXES:
        return False
    try:
        with open(path, "rb") as f:
            kind = sniff(f.read(64))
    except OSError:
        return False
    return kind in OPEN_KINDS or kind == "eps"  # eps: an `unsupported format` row, not silence


def _link_problem(p: Path, inside: Path, follow_external: bool) -> str | None:
    """Why a symlink is refused (None: fine to read)."""
    try:
        target = p.resolve(strict=True)
    except RuntimeError:  # Python's own loop detection
        return "symlink loop"
    except OSError as exc:
        return "symlink loop" if exc.errno == errno.ELOOP else "broken symlink"
    if not follow_external and not target.is_relative_to(inside):
        return "symlink to a file outside the folder (--follow-external-links reads it)"
    return None


def _count_files(folder: str) -> int:
    return sum(len(names) for _, _, names in os.walk(folder))


def find_images(folder: Path, exclude: set[Path], follow_external: bool = False,
                skipped: Counter | None = None, include_housekeeping: bool = False
                ) -> tuple[list[Path], int, list[tuple[Path, str]]]:
    """Image files under `folder` (sorted, hidden, housekeeping and linked folders skipped),
    the non-image count, and the refused symlinks with why; `skipped` counts the
    housekeeping files left out, by kind."""
    from PIL import Image

    Image.init()
    known = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    inside = folder.resolve()
    found, others, refused = [], 0, []
    skipped = Counter() if skipped is None else skipped
    for root, dirs, names in os.walk(folder):  # followlinks=False: a linked folder is not entered
        keep = []
        for d in sorted(dirs):
            kind = None if include_housekeeping else housekeeping(d, True)
            if kind:
                skipped[kind] += _count_files(os.path.join(root, d))
            elif not d.startswith(".") or include_housekeeping and housekeeping(d, True):
                keep.append(d)
        dirs[:] = keep
        for name in sorted(names):
            kind = None if include_housekeeping else housekeeping(name, False)
            if kind:
                skipped[kind] += 1
                continue
            p = Path(root) / name
            if p.is_symlink() and not name.startswith("."):
                why = _link_problem(p, inside, follow_external)
                if why:
                    if p.suffix.lower() in known:  # an image by its name (its target is never read)
                        refused.append((p, why))
                    else:
                        others += 1
                    continue
            if not p.is_file() or p.resolve() in exclude:
                continue
            if _looks_like_image(p, known):
                found.append(p)
            else:
                others += 1
    return found, others, refused


def _in_folder(p: Path, base: Path) -> str:
    """p relative to base through p's real folder, keeping p's own name (a link stays the link)."""
    return os.path.relpath(Path(os.path.realpath(p.parent)) / p.name, base.resolve())


def read_sidecar(image: Path, exts=SIDECARS) -> tuple[str | None, str | None]:
    """(the user's caption for `image`, a problem to report): its first sidecar file."""
    found, problems = read_sidecars(image, exts)
    return (found[0]["text"] if found else None), (problems[0] if problems else None)


def read_sidecars(image: Path, exts=SIDECARS) -> tuple[list[dict], list[str]]:
    """Every sidecar of `image` in `exts` order ([{ext, text}]), and the problems to report."""
    found, problems = [], []
    for suffix in exts:
        side = image.with_suffix(suffix)
        if side == image or not side.is_file():
            continue
        if side.is_symlink() and side.resolve().parent != image.parent.resolve():
            problems.append(f"{side.name}: caption file links out of the image's folder, not read")
            continue
        try:
            if side.stat().st_size > SIDECAR_MAX_BYTES:
                problems.append(f"{side.name}: caption file over {SIDECAR_MAX_BYTES} bytes, not read")
                continue
            text = side.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            problems.append(f"{side.name}: caption file is not UTF-8, not read")
            continue
        except OSError as exc:
            problems.append(f"{side.name}: cannot read caption file: {exc.strerror or exc}")
            continue
        if text.strip():
            found.append({"ext": suffix, "text": text.strip()})
    return found, problems


SIDECARS_TYPE = pa.list_(pa.struct([("ext", pa.string()), ("text", pa.string())]))


def caption_extensions(extra=()) -> tuple[str, ...]:
    """`.txt`, `.caption`, then the user's (`tags` and `.tags` alike), each once."""
    out = []
    for ext in (*SIDECARS, *extra):
        ext = ext.strip()
        ext = ext if ext.startswith(".") else "." + ext
        if len(ext) < 2 or "/" in ext or "\\" in ext:
            raise CurateError(f"--caption-ext {ext!r} is not a file extension")
        if ext.lower() not in (e.lower() for e in out):
            out.append(ext)
    return tuple(out)


def _user_captions(table: pa.Table, base: Path, s: Summary, exts=SIDECARS) -> pa.Table:
    """Fill `user_caption` and `user_sidecars` from each row's sidecars (rows whose source file is known)."""
    from curate.manifest import with_column

    values, sidecars = [], []
    old_sidecars = (table.column("user_sidecars").to_pylist() if "user_sidecars" in table.column_names
                    else [None] * table.num_rows)
    for src, old, old_side in zip(table.column("source_path").to_pylist(),
                                  table.column("user_caption").to_pylist(), old_sidecars):
        if not src:
            values.append(old)
            sidecars.append(old_side)
            continue
        # lexically: the manifest's folder may not exist yet (`manifests/../cg/a.png`)
        found, problems = read_sidecars(Path(os.path.normpath(base / src)), exts)
        s.errors += [f"{src}: {problem}" for problem in problems]
        values.append(found[0]["text"] if found else None)
        sidecars.append(found or None)
        s.sidecars.update(f["ext"] for f in found)
        s.several_sidecars += len(found) > 1
    s.user_captions = sum(1 for v in values if v)
    table = with_column(table, "user_caption", values)
    return with_column(table, "user_sidecars", pa.array(sidecars, SIDECARS_TYPE))


def inspect_file(path: str) -> dict:
    """Worker: digest of the bytes, size from the header, and a full (draft) decode."""
    out = {"width": None, "height": None, "error": None}
    out["source_size"], out["source_mtime_ns"] = changed.stat(path) or (None, None)
    try:
        out["sha256"] = file_sha256(path)
    except OSError as exc:  # still a row; its key derives from the path instead
        out["sha256"] = hashlib.sha256(f"unreadable\0{path}".encode()).hexdigest()
        out["error"] = f"ingest: cannot read file: {exc.strerror or exc}"
        return out
    try:
        out["width"], out["height"], _ = probe(path)
        open_image(path, draft_size=(64, 64))  # truncated / corrupt data fails here
    except ImageError as exc:
        out["error"] = f"ingest: {exc}"
    return out


def ingest(table: pa.Table | None, folder: Path, base: Path, name: str,
           workers: int | None = None, follow_external: bool = False, include_housekeeping: bool = False,
           caption_exts=SIDECARS) -> tuple[pa.Table, Summary]:
    """Add the folder's new image files to `table` (None: a new manifest)."""
    from curate.manifest import conform
    from curate.schema import MANIFEST_SCHEMA

    folder = Path(folder)
    if not folder.is_dir():
        raise CurateError(f"not a folder: {folder}")
    table = conform(table if table is not None else MANIFEST_SCHEMA.empty_table())
    s = Summary()
    known_src = {p for p in table.column("source_path").to_pylist() if p}
    known = known_src | {p for p in table.column("path").to_pylist() if p}  # + derived files
    keys = set(table.column("key").to_pylist())
    s.missing = sum(1 for p in known_src if not (base / p).exists())

    exclude = {p.resolve() for p in base.glob("*.parquet*")}
    files, s.not_images, refused = find_images(folder, exclude, follow_external, s.housekeeping,
                                               include_housekeeping)
    s.found = len(files) + len(refused)
    rel = [_in_folder(p, base) for p in files]
    table = _redo_changed(table, base, set(rel), workers, s)
    new = [(f, r) for f, r in zip(files, rel) if r not in known]
    bad = [(p, r, why) for p, why in refused if (r := _in_folder(p, base)) not in known]
    s.existing = s.found - len(new) - len(bad)

    try:
        infos, stopped = parallel_map(inspect_file, [str(f) for f, _ in new], workers or default_workers(),
                                      "ingesting"), None
    except PoolStopped as exc:  # a worker was killed: the finished files become rows (run() writes them)
        infos, stopped = exc.results, exc
    for p, r, why in bad:  # refused links: a row that says why, nothing read through them
        new.append((p, r))
        infos.append({"width": None, "height": None, "error": f"ingest: {why}",
                      "sha256": hashlib.sha256(f"unreadable\0{r}".encode()).hexdigest()})
    rows = []
    for (f, r), info in zip(new, infos):
        if info is UNFINISHED:
            continue
        key = f"local/{info['sha256'][:KEY_HEX]}"
        if key in keys:  # an identical copy already has that key
            s.copies += 1
            key = "local/" + hashlib.sha256(f"{info['sha256']}\0{r}".encode()).hexdigest()[:KEY_HEX]
        keys.add(key)
        if info["error"]:
            s.failed += 1
            s.errors.append(f"{r}: {info['error']}")
        rows.append({"key": key, "subset": name, "width": info["width"], "height": info["height"],
                     "path": r, "source_path": r, "error": info["error"], "sha256": info["sha256"],
                     "file_ext": f.suffix.lower().lstrip(".") or None,
                     "source_size": info.get("source_size"), "source_mtime_ns": info.get("source_mtime_ns")})
    s.added = len(rows)
    if rows:
        added = conform(pa.Table.from_pylist(rows))
        for col in table.schema:  # extension columns of earlier stages: null for new rows
            if col.name not in added.column_names:
                added = added.append_column(col, pa.nulls(added.num_rows, col.type))
        for name_, typ in (("sha256", pa.string()), *((c, pa.int64()) for c in changed.COLUMNS)):
            if name_ not in table.column_names:
                table = table.append_column(name_, pa.nulls(table.num_rows, typ))
        table = pa.concat_tables([table, added.select(table.column_names)], promote_options="permissive")
    table = _user_captions(table, base, s, caption_exts)
    s.rows = table.num_rows
    if stopped:
        stopped.table = table
        raise stopped
    return table, s


CLEARED = ("crop", "phash", "dhash", "dup_of", "tagger", "caption")  # derived from the old pixels


def _redo_changed(table: pa.Table, base: Path, present: set, workers, s: Summary) -> pa.Table:
    """Rows whose file was replaced under the same name: read again, derived facts cleared;
    rows from before sizes were recorded get today's as their baseline."""
    from curate.manifest import with_column

    if not table.num_rows:
        return table
    for c in changed.COLUMNS:
        if c not in table.column_names:
            table = table.append_column(c, pa.nulls(table.num_rows, pa.int64()))
    cols = table.select(["source_path", "sha256" if "sha256" in table.column_names else "source_path",
                         *changed.COLUMNS]).to_pydict()
    shas = cols["sha256"] if "sha256" in table.column_names else [None] * table.num_rows
    sizes, mtimes = list(cols["source_size"]), list(cols["source_mtime_ns"])
    redo = []
    for i, (src, sha) in enumerate(zip(cols["source_path"], shas)):
        if not src or src not in present:
            continue
        if sizes[i] is None or mtimes[i] is None:  # an older manifest: the baseline starts now
            sizes[i], mtimes[i] = changed.stat(base / src) or (None, None)
        elif changed.changed(base / src, sizes[i], mtimes[i], sha):
            redo.append(i)
    table = with_column(with_column(table, "source_size", pa.array(sizes, pa.int64())),
                        "source_mtime_ns", pa.array(mtimes, pa.int64()))
    if not redo:
        return table
    srcs = table.column("source_path").to_pylist()
    infos = parallel_map(inspect_file, [str(base / srcs[i]) for i in redo], workers or default_workers(), "re-reading")
    values = {c: table.column(c).to_pylist() for c in ("width", "height", "error", "path", *changed.COLUMNS,
                                                        *(c for c in ("sha256", *CLEARED) if c in table.column_names))}
    for i, info in zip(redo, infos):
        if info is UNFINISHED:
            continue
        s.changed += 1
        for c in ("width", "height", "error", "sha256", *changed.COLUMNS):
            if c in values:
                values[c][i] = info.get(c)
        if values["error"][i]:
            s.errors.append(f"{srcs[i]}: {values['error'][i]}")
        values["path"][i] = srcs[i]  # a derived crop of the old pixels is stale
        for c in CLEARED:
            if c in values:
                values[c][i] = None
    for c, v in values.items():
        table = with_column(table, c, pa.array(v, table.schema.field(c).type))
    return table


def run(folder: Path, out: Path, name: str | None = None, workers: int | None = None,
        follow_external: bool = False, include_housekeeping: bool = False, caption_exts=()) -> Summary:
    """Ingest `folder` into the manifest `out` (created, or grown if it exists)."""
    from curate import manifest as mf

    folder, out = Path(folder), Path(out)
    exts = caption_extensions(caption_exts)
    if not folder.is_dir():
        raise CurateError(f"not a folder: {folder}")
    name = name or folder.resolve().name
    if out.exists():
        table, meta = mf.read(out)
    else:
        table, meta = None, mf.new_provenance(source=f"local:{folder}")
    try:
        table, s = ingest(table, folder, out.parent, name, workers, follow_external, include_housekeeping, exts)
    except PoolStopped as exc:
        mf.write(exc.table, out, meta)
        raise
    mf.record_stage(meta, "ingest", folder=str(folder), name=name, caption_exts=list(exts))
    mf.write(table, out, meta)
    return s
