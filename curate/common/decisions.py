"""A person's review decisions, kept beside the manifest and obeyed by every stage.

Stored as an append-only sidecar `<manifest>.decisions.jsonl` (one JSON record a line,
each appended under a file lock and fsync'd), so a stage rewriting the manifest, a
killed server or two writers at once lose nothing. A stored record is the exchange
line plus `id`, `who`, `at`, `set` (the fields it gives the key) and `prev` (what
they were before); `{"action": "undo", "of": ID}` restores a record's `prev`.

Exchange format (`curate review --apply/--export`, one JSON object a line):

    {"key": K, "action": "drop", "reason": "..."}    reason optional
    {"key": K, "action": "restore"}
    {"key": K, "action": "keeper"}                   K becomes its cluster's keeper
    {"key": K, "action": "split"}                    K leaves its duplicate cluster
    {"key": K, "action": "crop", "box": [l, t, r, b]}   original pixels; null: automatic again
    {"key": K, "action": "caption", "text": "..."}   null: generated again
    {"key": K, "action": "seen"}                     looked at, nothing changed

Every stage reads them through `current(manifest_path)`.
"""

from __future__ import annotations

import getpass
import json
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from curate.errors import CurateError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: one writer at a time is the user's to keep
    fcntl = None

SUFFIX = ".decisions.jsonl"
DEFAULTS = {"dropped": None, "keeper": None, "split": False, "box": None, "caption": None, "seen": False}
PARAMS = {"drop": {"reason"}, "restore": set(), "keeper": set(), "split": set(),
          "crop": {"box"}, "caption": {"text"}, "seen": set()}
ACTIONS = tuple(PARAMS)
EDITS = ("keeper", "split", "box", "caption")  # fields that count as "edited by a person"
MIN_BOX = 16          # a crop box's smallest side in pixels (or the image's whole side when smaller)
MAX_SIDE = 1 << 16    # no image curate accepts is wider or taller (the decoder's guard is far below)


def box_problem(box, width=None, height=None) -> str | None:
    """Why `box` is no crop box of a width x height image (sizes unknown: only its shape and
    the absolute bounds), or None. Every reader of a box asks this: --apply, the page, the
    log replay and the crop stage (against the decoded image)."""
    if not (isinstance(box, list) and len(box) == 4 and all(type(v) is int for v in box)):
        return "box must be [left, top, right, bottom] in whole pixels"
    left, top, right, bottom = box
    w, h = width or MAX_SIDE, height or MAX_SIDE
    if not (0 <= left < right <= w and 0 <= top < bottom <= h):
        return f"box {box} is outside the {width or '?'}x{height or '?'} image"
    if right - left < min(MIN_BOX, w) or bottom - top < min(MIN_BOX, h):
        return f"box {box} is smaller than {MIN_BOX} pixels a side"
    return None


_FIELD_TYPES = {"dropped": (str, type(None)), "keeper": (int, type(None)), "split": (bool,),
                "caption": (str, type(None)), "seen": (bool,)}


def _field_problem(name: str, value) -> str | None:
    if name == "box":
        return None if value is None else box_problem(value)
    types = _FIELD_TYPES.get(name)
    if types is None:
        return f"unknown field {name!r}"
    if not isinstance(value, types) or (name == "keeper" and isinstance(value, bool)):
        return f"{name} has the wrong type ({type(value).__name__})"
    return None


def _record_problem(record) -> str | None:
    """Why a stored record cannot be replayed (a hand-edited or foreign log), or None."""
    if not isinstance(record, dict) or not isinstance(record.get("key"), str):
        return "not a decision record"
    for part in ("set", "prev"):
        fields = record.get(part)
        if fields is None:
            continue
        if not isinstance(fields, dict):
            return f"{part} is not a JSON object"
        for name, value in fields.items():
            problem = _field_problem(name, value)
            if problem:
                return f"{part}: {problem}"
    return None


def sidecar(manifest_path: str | os.PathLike) -> Path:
    p = Path(manifest_path)
    return p.with_name(p.name + SUFFIX)


@dataclass
class Decisions:
    """The state the log leads to: key -> fields (DEFAULTS), plus the log itself."""

    state: dict[str, dict] = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)
    where: dict[str, str] = field(default_factory=dict)  # key -> "file:line" its box came from
    torn: str | None = None  # a torn last line (kept aside by the next append), if any

    def get(self, key: str) -> dict:
        return {**DEFAULTS, **self.state.get(key, {})}

    def _replay(self, record: dict) -> None:
        st = self.state.setdefault(record["key"], dict(DEFAULTS))
        st.update(record.get("set") or {})
        self.log.append(record)

    @property
    def dropped(self) -> dict[str, str]:
        """key -> reason ("" when none was given) of every dropped row."""
        return {k: s["dropped"] for k, s in self.state.items() if s.get("dropped") is not None}

    def boxes(self) -> dict[str, list[int]]:
        return {k: list(s["box"]) for k, s in self.state.items() if s.get("box") is not None}

    def check_boxes(self, table) -> None:
        """Every box a person chose fits its row's image (the manifest's width x height);
        a bad one is a one-line error naming the log line it came from."""
        cols = table.select(["key", "width", "height"]).to_pydict()
        for key, w, h in zip(cols["key"], cols["width"], cols["height"]):
            box = (self.state.get(key) or {}).get("box")
            problem = box is not None and box_problem(list(box), w, h)
            if problem:
                raise CurateError(f"{self.where.get(key, 'review decisions')}: {problem} of {key}")

    def captions(self) -> dict[str, str]:
        return {k: s["caption"] for k, s in self.state.items() if s.get("caption") is not None}

    def counts(self, keys) -> dict[str, int]:
        """Looked at / dropped / edited among `keys` (the manifest's rows)."""
        keys = set(keys)
        out = {"looked_at": 0, "dropped": 0, "edited": 0}
        for k, s in self.state.items():
            if k not in keys:
                continue
            edited = any(s.get(f) not in (None, False) for f in EDITS)
            out["dropped"] += s.get("dropped") is not None
            out["edited"] += edited
            out["looked_at"] += bool(s.get("seen") or edited or s.get("dropped") is not None)
        return out

    def pending(self, table) -> dict[str, int]:
        """What the manifest does not show yet of the person's decisions (crop / caption not
        re-run since): boxes and caption edits, and kept rows crop or caption never did while
        they did the rest (a keeper the review chose or a dropped keeper's next best copy,
        skipped as duplicates before; or rows ingested since). `table`: as the review
        applied it; rows no stage uses (dropped, duplicate, failed) are left out."""
        from curate.common.caption_rules import person_text

        cols = table.select(["key", "crop", "caption", "dup_of", "error", "path"]).to_pydict()
        cropped = any(c is not None for c in cols["crop"])
        captioned = any(c is not None for c in cols["caption"])
        out = {"crop": 0, "caption": 0, "uncropped": 0, "uncaptioned": 0}
        for key, box, caption, dup, error, path in zip(*cols.values()):
            s = self.state.get(key) or {}
            if s.get("dropped") is not None or dup or error or not path:
                continue
            out["crop"] += s.get("box") is not None and list(s["box"]) != list(box or [])
            text = s.get("caption")
            out["caption"] += bool(text and person_text(text)) and person_text(text) != person_text(caption or "")
            out["uncropped"] += cropped and box is None and s.get("box") is None
            out["uncaptioned"] += captioned and caption is None and not text
        return out

    def applied(self, table):
        """The table with `dup_of` following the chosen keepers and split clusters; a
        cluster whose keeper was dropped keeps its next best copy (most pixels) instead."""
        from curate.manifest import with_column

        if not any(s.get("keeper") is not None or s.get("split") or s.get("dropped") is not None
                   for s in self.state.values()):
            return table
        keys = table.column("key").to_pylist()
        dup = table.column("dup_of").to_pylist()
        pixels = [(w or 0) * (h or 0) for w, h in zip(table.column("width").to_pylist(),
                                                      table.column("height").to_pylist())]
        pos = {k: i for i, k in enumerate(keys)}

        def members(root: str) -> list[int]:
            out = [i for i, d in enumerate(dup) if d == root]
            return out + [pos[root]] if out and root in pos else out

        def regroup(rows: list[int]) -> None:  # the chosen keeper (latest), else most pixels
            chosen = [i for i in rows if self.get(keys[i])["keeper"] is not None]
            keeper = max(chosen, key=lambda i: self.get(keys[i])["keeper"]) if chosen else \
                min(rows, key=lambda i: (-pixels[i], keys[i]))
            for i in rows:
                dup[i] = None if i == keeper else keys[keeper]

        for k in (k for k, s in self.state.items() if s.get("split") and k in pos):
            i = pos[k]
            dup[i] = None
            rest = [j for j, d in enumerate(dup) if d == k]
            if rest:
                regroup(rest)
        chosen = sorted(((s["keeper"], k) for k, s in self.state.items()
                         if s.get("keeper") is not None and k in pos and not s.get("split")))
        for _, k in chosen:  # oldest first: the latest choice in a cluster wins
            i = pos[k]
            rows = members(dup[i] or k)
            if rows:  # (a lone row pointing into another manifest counts too)
                for j in rows:
                    dup[j] = keys[i]
                dup[i] = None
        dropped = self.dropped
        for i in [i for i, k in enumerate(keys) if k in dropped and dup[i] is None]:
            rest = [j for j, d in enumerate(dup) if d == keys[i] and keys[j] not in dropped]
            if rest:  # dropping the keeper drops that image, not its whole cluster
                regroup(rest)
                dup[i] = next(keys[j] for j in rest if dup[j] is None)
        return with_column(table, "dup_of", dup)

    def exchange(self) -> list[dict]:
        """The current decisions as exchange lines, in the order they were made."""
        last: dict[tuple[str, str], int] = {}
        for n, r in enumerate(self.log):
            for f in r.get("set") or {}:
                last[(r["key"], f)] = n
        lines = []
        for (key, f), n in last.items():
            v = self.get(key)[f]
            if f == "dropped":
                line = {"key": key, "action": "drop", **({"reason": v} if v else {})} if v is not None else None
            elif f == "keeper":
                line = {"key": key, "action": "keeper"} if v is not None else None
            elif f == "split":
                line = {"key": key, "action": "split"} if v else None
            elif f == "box":
                line = {"key": key, "action": "crop", "box": v} if v is not None else None
            elif f == "caption":
                line = {"key": key, "action": "caption", "text": v} if v is not None else None
            else:
                st = self.get(key)
                line = {"key": key, "action": "seen"} if v and all(
                    st[g] in (None, False) for g in DEFAULTS if g != "seen") else None
            if line:
                lines.append((n, line))
        return [line for _, line in sorted(lines, key=lambda x: x[0])]


def cross_losers(reviewed: list) -> dict[str, str]:
    """Keys that lost to a keeper a person chose in *another* manifest: a CG repost that
    dedupe --against marked as a copy of a reg post, made the keeper in review, leaves the
    reg copy out (and the other way round when the reg copy was chosen later). `reviewed`:
    (manifest table as dedupe left it, its Decisions) for every manifest of the run.
    Returns loser key -> the key that won (the loser's dup_of, as the stages see it)."""
    chosen: dict[str, str] = {}  # key -> when its keeper choice was made (comparable across logs)
    for _, d in reviewed:
        for rec in d.log:
            st = d.state.get(rec.get("key"), {})
            if rec.get("action") == "keeper" and st.get("keeper") is not None and not st.get("split"):
                chosen[rec["key"]] = rec.get("at") or ""
    losers: dict[str, str] = {}
    for table, d in reviewed:
        cols = table.select(["key", "dup_of"]).to_pydict()
        own = set(cols["key"])
        for key, root in zip(cols["key"], cols["dup_of"]):
            if not root or root in own or key not in chosen or d.get(key)["dropped"] is not None:
                continue
            if chosen.get(root, "") > chosen[key]:
                losers[key] = root
            else:
                losers[root] = key
    return losers


def pending_note(review: Decisions, table, where) -> str | None:
    """A warning for export and train when the manifest lags the person's decisions."""
    n = review.pending(table)
    todo = []
    for stage, parts in (("crop", (("crop", "crop boxes from review"), ("uncropped", "kept rows not cropped"))),
                         ("caption", (("caption", "captions from review"),
                                      ("uncaptioned", "kept rows without a caption")))):
        said = [f"{n[k]} {what}" for k, what in parts if n[k]]
        if said:
            todo.append(f"{' and '.join(said)} (curate {stage})")
    return f"{where}: not in the manifest yet: {'; '.join(todo)}: re-run those stages" if todo else None


def current(manifest_path: str | os.PathLike) -> Decisions:
    """THE way a stage reads the person's decisions for a manifest (none: empty)."""
    path = sidecar(manifest_path)
    d = Decisions()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return d
    except (OSError, UnicodeDecodeError) as exc:
        raise CurateError(f"cannot read review decisions {path}: {exc}") from None
    lines = text.split("\n")  # (only \n ends a record: U+2028 and friends are text inside one)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        problem = _record_problem(record) if record is not None else "damaged decision record"
        if problem:
            if n == len(lines):  # a write cut short by a crash: the rest of the log stands
                d.torn = line
                continue
            raise CurateError(f"{path}:{n}: {problem}")
        if "box" in (record.get("set") or {}):
            d.where[record["key"]] = f"{path}:{n}"
        d._replay(record)
    return d


def check(line: dict, rows: dict[str, dict], where: str) -> str | None:
    """Why an exchange line is wrong (one line naming `where`), or None. rows: key -> {width, height}."""
    if not isinstance(line, dict):
        return f"{where}: not a JSON object"
    action = line.get("action")
    if not isinstance(action, str) or action not in PARAMS:  # (a list or object is no action either)
        return f"{where}: unknown action {action!r} (one of {', '.join(ACTIONS)})"
    extra = set(line) - {"key", "action"} - PARAMS[action]
    if extra:
        return f"{where}: unknown field {sorted(extra)[0]!r} for action {action!r}"
    key = line.get("key")
    if not isinstance(key, str) or key not in rows:
        return f"{where}: unknown key {key!r}"
    if action == "drop" and not isinstance(line.get("reason", ""), (str, type(None))):
        return f"{where}: reason must be text"
    if action == "caption" and not isinstance(line.get("text"), (str, type(None))):
        return f"{where}: text must be text or null"
    if action == "crop":
        box = line.get("box")
        problem = box is not None and box_problem(box, rows[key].get("width"), rows[key].get("height"))
        if problem:
            return f"{where}: {problem} of {key}" if "image" in problem else f"{where}: {problem}"
    return None


def effect(line: dict, seq: int) -> dict:
    """The fields an exchange line gives its key."""
    a = line["action"]
    if a == "drop":
        return {"dropped": line.get("reason") or "", "seen": True}
    if a == "restore":
        return {"dropped": None, "seen": True}
    if a == "keeper":
        return {"keeper": seq, "seen": True}
    if a == "split":
        return {"split": True, "seen": True}
    if a == "crop":
        return {"box": line.get("box"), "seen": True}
    if a == "caption":
        return {"caption": line.get("text"), "seen": True}
    return {"seen": True}


def reviewer() -> str:
    try:
        return os.environ.get("CURATE_REVIEWER") or getpass.getuser()
    except Exception:  # no user name (containers)
        return "unknown"


def append(manifest_path: str | os.PathLike, lines: list[dict], who: str | None = None,
           undo: list[str] = ()) -> list[dict]:
    """Append checked exchange lines (and undos of record ids) atomically; the stored records."""
    return record(manifest_path, lines, who, undo)[0]


def record(manifest_path: str | os.PathLike, lines: list[dict], who: str | None = None,
           undo: list[str] = ()) -> tuple[list[dict], Decisions]:
    """`append`, also returning the decisions as they stand after it."""
    path = sidecar(manifest_path)
    who = who or reviewer()
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as exc:
        raise CurateError(f"cannot write review decisions {path}: {exc.strerror}") from None
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        d = current(manifest_path)  # under the lock: prev values are what this record replaces
        by_id = {r.get("id"): r for r in d.log}
        records = []
        for target in undo:
            old = by_id.get(target)
            if old is None:
                raise CurateError(f"no decision {target!r} to undo")
            records.append({"key": old["key"], "action": "undo", "of": target, "set": dict(old.get("prev") or {})})
        for line in lines:
            records.append({**line, "set": effect(line, len(d.log) + len(records))})
        for r in records:
            st = d.get(r["key"])
            r.update(id=uuid.uuid4().hex[:12], who=who, at=now, prev={f: st[f] for f in r["set"]})
            d._replay(r)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        _write_whole(fd, path, data)
        return records, d
    except OSError as exc:
        raise CurateError(f"cannot write review decisions {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _write_whole(fd: int, path: Path, data: bytes) -> None:
    """Append `data` on a line boundary, whole or not at all (under the caller's lock).

    A last line without its newline is either a whole record (a hand edit, an editor that
    strips the final newline: it gets its newline and stays) or a torn one (a writer killed
    mid-line, a full disk): that one is copied to `<log>.torn` and reported, then cut. A
    write that fails part way (ENOSPC, EIO) is cut back to where it started, so a half
    record never sits in front of the next one, and the caller hears the error."""
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        tail = os.pread(fd, min(size, 1 << 20), max(0, size - (1 << 20)))
        start = size - len(tail) + tail.rfind(b"\n") + 1
        last = os.pread(fd, size - start, start)
        try:
            whole = _record_problem(json.loads(last.decode("utf-8"))) is None
        except ValueError:
            whole = False
        if whole:
            data = b"\n" + data
        else:
            aside = path.with_name(path.name + ".torn")
            with open(aside, "ab") as f:  # kept, never lost silently
                f.write(last + b"\n")
                f.flush()
                os.fsync(f.fileno())
            os.ftruncate(fd, start)
            size = start
            import sys

            print(f"warning: {path}: a torn last line ({len(last)} bytes) was kept aside in {aside}",
                  file=sys.stderr)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError:
        try:
            os.ftruncate(fd, size)  # not at all: the log ends where it did
        except OSError:
            pass
        raise


def read_lines(file: str | os.PathLike) -> list[tuple[str, dict]]:
    """(where, object) per non-blank line of an exchange file ("-": standard input; a
    UTF-8 BOM, as Windows editors write, is fine); bad JSON is a one-line error."""
    file = Path(file)
    try:
        if str(file) == "-":
            import sys

            text, file = sys.stdin.buffer.read().decode("utf-8-sig"), "<stdin>"
        else:
            text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CurateError(f"cannot read {file}: {getattr(exc, 'strerror', None) or exc}") from None
    out = []
    # lines end at \n (CRLF too) only: str.splitlines() would also cut at U+2028, U+2029,
    # NEL and other separators a caption may hold inside its JSON string
    for n, raw in enumerate(text.split("\n"), 1):
        raw = raw.removesuffix("\r")
        if not raw.strip():
            continue
        try:
            out.append((f"{file}:{n}", json.loads(raw)))
        except ValueError as exc:
            raise CurateError(f"{file}:{n}: not JSON ({exc.msg})") from None
    return out


def size_index(manifest_path) -> dict[str, dict]:
    from curate import manifest

    table, _ = manifest.read(manifest_path)
    cols = table.select(["key", "width", "height"]).to_pydict()
    return {k: {"width": w, "height": h} for k, w, h in zip(cols["key"], cols["width"], cols["height"])}


def apply_file(manifests: list, file) -> dict[str, int]:
    """`--apply`: check every line against the manifests first; apply all or nothing."""
    index = [(Path(m), size_index(m)) for m in manifests]
    plan: dict[Path, list[dict]] = {m: [] for m, _ in index}
    for where, line in read_lines(file):
        holders = [(m, rows) for m, rows in index
                   if isinstance(line, dict) and isinstance(line.get("key"), str) and line["key"] in rows]
        problem = check(line, holders[0][1] if holders else {}, where)
        if problem:
            raise CurateError(problem)
        for m, _ in holders:  # a key in several manifests: it is decided in each
            plan[m].append({k: line[k] for k in ("key", "action", *PARAMS[line["action"]]) if k in line})
    return {str(m): len(append(m, lines)) if lines else 0 for m, lines in plan.items()}


def _line(x: dict) -> str:
    """One exchange line; the separators other readers break lines at stay escaped."""
    text = json.dumps(x, ensure_ascii=False)
    for c in ("\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"):
        text = text.replace(c, f"\\u{ord(c):04x}")
    return text + "\n"


def export_file(manifests: list, file) -> int:
    """`--export`: the current decisions of every manifest, one exchange line each
    ("-": to standard output)."""
    lines = [line for m in manifests for line in current(m).exchange()]
    if str(file) == "-":
        import sys

        sys.stdout.write("".join(_line(x) for x in lines))
        sys.stdout.flush()
        return len(lines)
    file = Path(file)
    tmp = file.with_name(file.name + ".part")
    try:
        tmp.write_text("".join(_line(x) for x in lines), encoding="utf-8")
        os.replace(tmp, file)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # no folder to write in: nothing was left there either
            pass
        raise CurateError(f"cannot write {file}: {exc.strerror}") from None
    return len(lines)
