"""Aspect-ratio buckets, as kohya sd-scripts makes and assigns them.

`make_bucket_resolutions` and `select_bucket` follow sd-scripts (library/model_util.py
and BucketManager in library/train_util.py) step for step, so a dataset lands in the
same buckets under `curate train` as under sd-scripts. An image is resized to cover
its bucket (aspect kept) and the overhang is cropped from the centre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RECIPE_BUCKETS = (1024, 256, 4096, 32)  # resolution, min, max, step (configs/baxl_v3.toml)


def make_bucket_resolutions(max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024,
                            divisible: int = 64) -> list[tuple[int, int]]:
    """(width, height) buckets of about max_reso's area, sides in [min_size, max_size]."""
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


@dataclass(frozen=True)
class Placement:
    bucket: tuple[int, int]        # (width, height) the model sees
    resized: tuple[int, int]       # (width, height) after the cover resize
    crop: tuple[int, int]          # (left, top) of the bucket inside the resized image


class Buckets:
    """Assigns images to buckets. With no_upscale, buckets are made per image (never larger
    than the image, area at most max_reso's) and min/max_bucket_reso do not apply."""

    def __init__(self, max_reso: tuple[int, int], min_size: int, max_size: int, steps: int,
                 no_upscale: bool = False):
        self.no_upscale = no_upscale
        self.max_area = max_reso[0] * max_reso[1]
        self.steps = steps
        self.predefined = [] if no_upscale else make_bucket_resolutions(max_reso, min_size, max_size, steps)
        self._predefined_set = set(self.predefined)
        self._aspects = np.array([w / h for w, h in self.predefined])

    def place(self, width: int, height: int) -> Placement:
        bucket, resized = self.select_bucket(width, height)
        left = (resized[0] - bucket[0]) // 2   # centre crop, as sd-scripts without random_crop
        top = (resized[1] - bucket[1]) // 2
        return Placement(bucket, resized, (left, top))

    def select_bucket(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(bucket, resized size) exactly as sd-scripts' BucketManager.select_bucket."""
        aspect = width / height
        if not self.no_upscale:
            reso = (width, height)
            if reso not in self._predefined_set:  # else: already a bucket's size
                reso = self.predefined[int(np.abs(self._aspects - aspect).argmin())]
            # scale so the image covers the bucket: match the side that is relatively shorter
            scale = reso[1] / height if aspect > reso[0] / reso[1] else reso[0] / width
            return reso, (int(width * scale + 0.5), int(height * scale + 0.5))
        if width * height > self.max_area:  # too big: shrink to max area, keep aspect
            rw = math.sqrt(self.max_area * aspect)
            rh = self.max_area / rw
            bw = self._round(rw)
            ar_w = bw / self._round(bw / aspect)
            bh = self._round(rh)
            ar_h = self._round(bh * aspect) / bh
            if abs(ar_w - aspect) < abs(ar_h - aspect):
                resized = (bw, int(bw / aspect + 0.5))
            else:
                resized = (int(bh * aspect + 0.5), bh)
        else:
            resized = (width, height)
        bucket = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
        return bucket, resized

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.steps


def resize_and_crop(image, placement: Placement):
    """PIL image -> the bucket-sized PIL image (Lanczos resize to cover, then crop)."""
    from PIL import Image

    if image.size != placement.resized:
        image = image.resize(placement.resized, Image.Resampling.LANCZOS)
    left, top = placement.crop
    return image.crop((left, top, left + placement.bucket[0], top + placement.bucket[1]))
