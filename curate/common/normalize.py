"""What a trainer reads must be the pixels curate measured, tagged and bucketed.

sd-scripts reads an image with `Image.open(path).convert("RGB")`: no EXIF orientation,
alpha dropped (transparent pixels become whatever colour they store, often black), and
only files named .png/.jpg/.jpeg/.webp/.bmp (any case) are globbed at all. curate sees
every image through `images.open_image`: upright, alpha flattened on
`images.alpha_background()`, first frame. `decide` tells, from the header alone, whether
the original already reads the same in both; `write_png` makes the copy when it does not.

    decide(path) -> Form          link the original (maybe under another extension) or copy
    write_png(src, dst)           lossless copy of the pixels curate sees
    check_background()            a malformed CURATE_ALPHA_BACKGROUND is a one-line error
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from curate.common import decode as images
from curate.errors import CurateError

# content kind -> the names sd-scripts globs for it (first: the one curate gives a renamed file)
READABLE = {"jpg": (".jpg", ".jpeg"), "png": (".png",), "webp": (".webp",), "bmp": (".bmp",)}
# modes whose convert("RGB") is exactly images.to_rgb (16-bit, alpha modes are not)
PLAIN_MODES = {"RGB", "L", "1", "P", "CMYK", "YCbCr"}


@dataclass(frozen=True)
class Form:
    ext: str            # extension of the exported file (lower case)
    copy: bool          # True: write a normalized PNG; False: link the original bytes
    why: str | None     # None: the original qualifies as it is


def decide(path: str | os.PathLike) -> Form:
    """How to hand `path` to sd-scripts so it reads what curate read (images.ImageError if unreadable)."""
    kind, mode, orientation, alpha = images.stored_form(path)
    suffix = Path(path).suffix.lower()
    if orientation in range(2, 9):
        return Form(".png", True, "EXIF-rotated")
    if alpha:
        return Form(".png", True, "transparency flattened")
    if kind not in READABLE:
        return Form(".png", True, f"{kind} converted to png")
    if mode not in PLAIN_MODES:
        return Form(".png", True, f"{mode} pixels converted")
    if suffix not in READABLE[kind]:
        return Form(READABLE[kind][0], False, f"{suffix or 'unnamed'} {kind} renamed {READABLE[kind][0]}")
    return Form(suffix, False, None)


def write_png(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """The pixels images.open_image gives (upright, flattened, frame 0) as a PNG, atomically."""
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".part")
    try:
        images.open_image(src).save(tmp, "PNG", compress_level=4)
        os.replace(tmp, dst)
    except OSError as exc:
        with contextlib.suppress(OSError):  # (no folder to clean up in: a file stands in its place)
            tmp.unlink(missing_ok=True)
        raise CurateError(f"cannot write {dst}: {exc.strerror or exc}") from None


def check_background() -> tuple[int, int, int]:
    text = os.environ.get(images.ALPHA_BACKGROUND_ENV)
    if text is not None and text.strip() and images.parse_colour(text) is None:
        raise CurateError(f"{images.ALPHA_BACKGROUND_ENV}={text!r}: expected a colour like #ffffff")
    return images.alpha_background()
