"""sd-scripts' cache files beside the images it trains on, and what an export changed.

sd-scripts caches latents and text-encoder outputs next to each image and trusts them by
name: a latents file whose size fits the bucket, a TE file whose keys exist; it never
looks at the pixels or the caption again (kohya_ss #1629). The names (library/strategy_*.py):

    <stem>.npz                           latents, the old name (SD/SDXL still read it first)
    <stem>_<W:04d>x<H:04d>_sd.npz        latents, SD 1/2    (_sdxl, _sd3, _flux, _lumina,
                                         _hi, _anima: the other model families)
    <stem>_te_outputs.npz                SDXL text-encoder outputs (_sd3_te, _flux_te, ...)

Export records a content hash of each exported image's pixels (the source file's bytes,
rehashed only when its size or mtime changed) and of its caption; a re-export removes the
latents of images whose pixels changed and the TE outputs of those whose caption changed.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from curate.common.digest import file_sha256

LATENT_FAMILIES = ("sd", "sdxl", "sd3", "flux", "lumina", "hi", "anima")
TE_SUFFIXES = ("te_outputs", "sd3_te", "flux_te", "lumina_te", "hi_te", "anima_te")


def latent_pattern(stem: str) -> re.Pattern:
    families = "|".join(LATENT_FAMILIES)
    return re.compile(rf"{re.escape(stem)}(\.npz|_\d{{4}}x\d{{4}}_({families})\.npz)")


def te_pattern(stem: str) -> re.Pattern:
    return re.compile(rf"{re.escape(stem)}_({'|'.join(TE_SUFFIXES)})\.npz")


def caches_of(image: Path, latents: bool = True, te: bool = True) -> list[Path]:
    """sd-scripts' cache files of `image` in its folder (latents and/or TE outputs)."""
    patterns = [p for p, on in ((latent_pattern(image.stem), latents), (te_pattern(image.stem), te)) if on]
    try:
        names = [p for p in image.parent.iterdir() if p.suffix == ".npz"]
    except OSError:
        return []
    return sorted(p for p in names if any(pat.fullmatch(p.name) for pat in patterns))


def fingerprint(source: Path) -> str:
    st = source.stat()
    return f"{source.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def pixels_hash(source: Path, previous: dict | None) -> tuple[str, str]:
    """(sha256 of the source file, its fingerprint); the last export's hash is reused while
    the file's path, size and mtime are unchanged (a re-export reads no unchanged image)."""
    fp = fingerprint(source)
    if previous and previous.get("source") == fp and previous.get("pixels"):
        return previous["pixels"], fp
    return file_sha256(source), fp


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stale(image: Path, old: dict | None, new: dict) -> list[Path]:
    """The caches beside `image` that no longer fit what this export writes: latents when the
    pixels changed, TE outputs when the caption changed; all of them without a record."""
    if old is None:
        return caches_of(image)
    return caches_of(image, latents=old.get("pixels") != new["pixels"], te=old.get("caption") != new["caption"])
