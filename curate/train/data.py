"""Training data from manifests: which images, in which bucket, in which order, with
which caption. Everything here is decided without a model, so `--dry-run` shows it.

- Rows with `error` or `dup_of` are skipped; the caption is the `caption` column, or the
  `.txt` beside the image, or (reg sets) the class token.
- Reg balancing: each epoch has as many reg samples as training samples (with repeats),
  as in sd-scripts, but drawn afresh per epoch from every reg subset in proportion to its
  size (reg_balance.window: a seeded stream, so every reg image comes up before any
  comes up twice). Each bucket gets a fixed share of the draw (at least one when there
  are enough), so every epoch has the same batches count, and the draw is a pure
  function of (seed, epoch): a resumed run draws what the uninterrupted one would.
- Each epoch shuffles every bucket and then the batches, from a seed made of (seed,
  epoch); a batch holds images of one bucket. Per-sample randomness (caption shuffle,
  dropout, flip) is seeded by (seed, epoch, batch, slot), so a resumed run sees exactly
  the data an uninterrupted one would, whatever the number of loader workers.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from curate import manifest
from curate.common import caption_rules, decisions, normalize, reg_balance
from curate.common.buckets import Buckets, Placement, resize_and_crop
from curate.common.decode import ImageError, open_image, probe
from curate.common.digest import file_sha256
from curate.common.train_config import DatasetConfig, TrainConfig
from curate.errors import CurateError


@dataclass
class Sample:
    key: str
    path: Path
    caption: str
    size: tuple[int, int]          # (width, height) of the file, display orientation
    placement: Placement
    dataset: int                   # index into config.datasets
    is_reg: bool
    keep_separator: str | None
    subset: str = ""
    repeats: int = 1
    content_hash: str = ""         # filled when latents are cached
    is_val: bool = False           # held out: validation loss only, never trained on


@dataclass
class RegPool:
    """A bucket's reg images, grouped by reg subset, and how many it draws each epoch."""
    take: int
    groups: list          # [[sample index, ...] per reg subset]
    seed: str

    def draw(self, epoch: int) -> list[int]:
        flat = [i for group in self.groups for i in group]
        return [flat[p] for p in reg_balance.window([len(g) for g in self.groups], self.take, epoch, self.seed)]


@dataclass
class Plan:
    """The resolved data of a run: samples, buckets, epoch length."""
    config: TrainConfig
    samples: list[Sample]
    buckets: dict[tuple[int, int], list[int]]   # bucket -> training sample indices, one per repeat
    reg_pools: dict[tuple[int, int], RegPool] = field(default_factory=dict)  # bucket -> its reg draw
    skipped: Counter = field(default_factory=Counter)
    reg_available: int = 0
    num_processes: int = 1
    review_pending: list = field(default_factory=list)  # curate review boxes/text crop/caption have not applied
    val: list = field(default_factory=list)  # held-out sample indices (validation loss)

    def bucket_sizes(self) -> dict[tuple[int, int], int]:
        """Samples per bucket in every epoch (training with repeats + the reg draw)."""
        keys = set(self.buckets) | set(self.reg_pools)
        return {b: len(self.buckets.get(b, [])) + (self.reg_pools[b].take if b in self.reg_pools else 0)
                for b in sorted(keys)}

    @property
    def batches_per_epoch(self) -> int:  # per process
        total = sum(math.ceil(n / self.config.train_batch_size) for n in self.bucket_sizes().values() if n)
        return math.ceil(total / self.num_processes)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.config.gradient_accumulation_steps)

    @property
    def total_steps(self) -> int:
        if self.config.max_train_epochs is not None:
            return self.config.max_train_epochs * self.steps_per_epoch
        return self.config.max_train_steps

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / max(self.steps_per_epoch, 1))

    def epoch_items(self, epoch: int) -> dict[tuple[int, int], list[int]]:
        """bucket -> the sample indices of this epoch: training ones, then this epoch's reg draw."""
        out = {}
        for bucket in self.bucket_sizes():
            pool = self.reg_pools.get(bucket)
            out[bucket] = list(self.buckets.get(bucket, [])) + (pool.draw(epoch) if pool else [])
        return out

    def epoch_batches(self, epoch: int, process: int = 0) -> list[list[int]]:
        """This process's batches of an epoch: lists of sample indices, one bucket each."""
        rng = random.Random(f"{self.config.seed}:epoch:{epoch}")
        batches = []
        size = self.config.train_batch_size
        for bucket, items in self.epoch_items(epoch).items():
            rng.shuffle(items)
            batches += [items[i:i + size] for i in range(0, len(items), size)]
        rng.shuffle(batches)
        n = self.num_processes
        batches += batches[:(-len(batches)) % n]  # every process the same count (a few repeat)
        return batches[process::n]

    def reg_use(self) -> dict[str, dict]:
        """Per reg subset: images available, drawn per epoch (min, max), distinct over the run."""
        label = {}
        for pool in self.reg_pools.values():
            for group in pool.groups:
                for i in group:
                    label[i] = self.samples[i].subset
        names = list(dict.fromkeys(self.samples[i].subset for i in sorted(label)))
        use = {name: {"available": 0, "per_epoch": [None, 0], "used_over_run": set()} for name in names}
        for i in label:
            use[label[i]]["available"] += 1
        for epoch in range(self.epochs if self.reg_pools else 0):
            drawn = Counter()
            for pool in self.reg_pools.values():
                for i in pool.draw(epoch):
                    drawn[label[i]] += 1
                    use[label[i]]["used_over_run"].add(i)
            for name, u in use.items():
                lo, hi = u["per_epoch"]
                u["per_epoch"] = [drawn[name] if lo is None else min(lo, drawn[name]), max(hi, drawn[name])]
        return {name: {"available": u["available"], "per_epoch": [u["per_epoch"][0] or 0, u["per_epoch"][1]],
                       "used_over_run": len(u["used_over_run"])} for name, u in use.items()}

    def used_indices(self) -> set[int]:
        """Every sample the run draws at least once (what the latent cache needs)."""
        used = {i for v in self.buckets.values() for i in v} | set(self.val)
        for epoch in range(self.epochs if self.reg_pools else 0):
            for pool in self.reg_pools.values():
                used.update(pool.draw(epoch))
        return used

    def summary(self) -> dict:
        """What --dry-run prints: buckets, counts, balance, steps."""
        per_bucket = []
        for (w, h), n in self.bucket_sizes().items():
            if not n:
                continue
            reg = self.reg_pools[(w, h)].take if (w, h) in self.reg_pools else 0
            per_bucket.append({"width": w, "height": h, "images": n, "train": n - reg, "reg": reg})
        train = [s for s in self.samples if not s.is_reg and not s.is_val]
        c = self.config
        reg_subsets = self.reg_use()
        warnings = [f"reg subset {name!r}: none of its {u['available']} images is drawn in this run "
                    "(more epochs or training repeats would)" for name, u in reg_subsets.items()
                    if not u["used_over_run"]] + list(self.review_pending)
        return {
            "config": str(c.source), "pretrained": c.pretrained, "output_dir": str(c.output_dir),
            "predefined_buckets": len(Buckets(c.max_reso, c.min_bucket_reso, c.max_bucket_reso,
                                              c.bucket_reso_steps, c.bucket_no_upscale).predefined),
            "buckets_used": len(per_bucket), "buckets": per_bucket,
            "train_images": len(train), "train_samples": sum(s.repeats for s in train),
            "reg_images_available": self.reg_available,
            "validation_images": len(self.val),
            "validation_reg_images": sum(self.samples[i].is_reg for i in self.val),
            "reg_images_used": sum(u["used_over_run"] for u in reg_subsets.values()),
            "reg_samples": sum(p.take for p in self.reg_pools.values()),
            "reg_subsets": reg_subsets,
            "skipped": dict(sorted(self.skipped.items())),
            "batch_size": c.train_batch_size, "gradient_accumulation_steps": c.gradient_accumulation_steps,
            "batches_per_epoch": self.batches_per_epoch, "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.epochs, "total_optimizer_steps": self.total_steps, "warnings": warnings,
        }


def plan(config: TrainConfig, num_processes: int = 1) -> Plan:
    """Read every manifest, place images in buckets, share the reg draw among buckets."""
    normalize.check_background()  # the pixels below are flattened on it, as the tagger's were
    buckets = Buckets(config.max_reso, config.min_bucket_reso, config.max_bucket_reso,
                      config.bucket_reso_steps, config.bucket_no_upscale)
    samples: list[Sample] = []
    skipped: Counter = Counter()
    pending: list[str] = []
    losers = decisions.cross_losers([(manifest.read(ds.manifest)[0], decisions.current(ds.manifest))
                                     for ds in config.datasets])
    for i, ds in enumerate(config.datasets):
        read = _read_dataset(ds, i, buckets, skipped, config.weighted_captions, pending, losers)
        _hold_out(read, ds, config, i)
        samples += read
    train = [s for s in samples if not s.is_reg and not s.is_val]
    if not train:
        raise CurateError("no training images left (every row skipped or held out, or every dataset is a reg set)")
    by_bucket: dict[tuple[int, int], list[int]] = {}
    reg_groups: dict[tuple[int, int], dict[tuple[int, str], list[int]]] = {}
    for idx, s in enumerate(samples):
        if s.is_val:
            continue
        if s.is_reg:
            reg_groups.setdefault(s.placement.bucket, {}).setdefault((s.dataset, s.subset), []).append(idx)
        else:
            by_bucket.setdefault(s.placement.bucket, []).extend([idx] * s.repeats)
    # as many reg samples per epoch as training samples (sd-scripts' balance), shared by bucket size
    order = sorted(reg_groups)
    takes = reg_balance.allocate(sum(s.repeats for s in train),
                                 [sum(len(g) for g in reg_groups[b].values()) for b in order], minimum=1)
    pools = {b: RegPool(take, list(reg_groups[b].values()), f"{config.seed}:reg:{b[0]}x{b[1]}")
             for b, take in zip(order, takes)}  # take 0 kept: the dry run reports its images unused
    reg_available = sum(s.is_reg and not s.is_val for s in samples)
    val = [i for i, s in enumerate(samples) if s.is_val]
    return Plan(config, samples, by_bucket, pools, skipped, reg_available, num_processes, pending, val)


def _hold_out(samples: list[Sample], ds: DatasetConfig, config: TrainConfig, index: int) -> None:
    """Mark the held-out rows: the whole dataset (is_val) or a seeded fraction of it, chosen by key
    so the split stays put when rows are added elsewhere. Reg sets only with validation_split_reg."""
    if ds.is_val:
        for s in samples:
            s.is_val = True
        return
    fraction = ds.validation_split if ds.validation_split is not None else config.validation_split
    if not samples or not fraction or (samples[0].is_reg and ds.validation_split is None
                                       and not config.validation_split_reg):
        return
    n = max(1, round(fraction * len(samples)))
    rank = sorted(samples, key=lambda s: hashlib.sha256(f"{config.seed}:val:{index}:{s.key}".encode()).digest())
    for s in rank[:n]:
        s.is_val = True


def _read_dataset(ds: DatasetConfig, index: int, buckets: Buckets, skipped: Counter,
                  weighted: bool | None = None, pending: list | None = None, losers=()) -> list[Sample]:
    table, meta = manifest.read(ds.manifest)
    escaped = meta.get("stages", {}).get("caption", {}).get("escaped", {}) or {}
    review = decisions.current(ds.manifest)  # a person's drops and keepers win
    table, dropped = review.applied(table), review.dropped
    note = decisions.pending_note(review, table, ds.manifest)
    if note and pending is not None:
        pending.append(note)
    is_reg = ds.is_reg if ds.is_reg is not None else meta.get("kind") == "reg"
    class_token = ds.class_tokens or meta.get("class_token")
    separators = meta.get("stages", {}).get("caption", {}).get("keep_separators", {}) or {}
    root = ds.manifest.parent
    out = []
    for row in table.select(["key", "subset", "path", "error", "dup_of", "caption"]).to_pylist():
        if row["key"] in dropped:
            skipped["dropped in review"] += 1
            continue
        if row["key"] in losers:
            skipped["duplicate (review chose the copy in another manifest)"] += 1
            continue
        if row["error"]:
            skipped["error set"] += 1
            continue
        if row["dup_of"]:
            skipped["duplicate"] += 1
            continue
        if not row["path"] or not (root / row["path"]).is_file():
            skipped["no image on disk"] += 1
            continue
        path = root / row["path"]
        # a .txt beside the image only where curate caption never ran (None); "" is its answer
        caption = row["caption"] if row["caption"] is not None else _txt_caption(path)
        caption = caption or (class_token if is_reg else None)
        if not caption:
            skipped["no caption (column or .txt)"] += 1
            continue
        if not ds.enable_wildcard:  # a user's lines are alternatives: sd-scripts reads the first
            caption = caption.split("\n", 1)[0]
        caption = _text_for_encoder(caption, bool(escaped.get(row["subset"] or "")), weighted, ds.manifest)
        try:
            w, h, _ = probe(path)
        except ImageError:
            skipped["unreadable image"] += 1
            continue
        placement = buckets.place(w, h)
        if min(placement.bucket) <= 0:
            skipped["smaller than bucket_reso_steps"] += 1
            continue
        sep = ds.keep_tokens_separator if ds.keep_tokens_separator is not None else separators.get(row["subset"] or "")
        out.append(Sample(row["key"], path, caption, (w, h), placement, index, is_reg, sep or None,
                          subset=row["subset"] or "", repeats=ds.num_repeats))
    return out


def _text_for_encoder(caption: str, escaped: bool, weighted: bool | None, where: Path) -> str:
    """Escaped captions (caption's escape_parentheses) need weighted_captions, and it
    needs them: the text encoder gets `(` for `\\(`, as from a prompt UI. (Weights such
    as `(tag:1.2)` are not applied by curate train.)"""
    if escaped:
        if weighted is False:
            raise CurateError(f"{where}: captions carry \\( escapes (escape_parentheses); "
                              "set weighted_captions = true or caption without escapes")
        return caption_rules.unescape(caption)
    if weighted and ("(" in caption or ")" in caption):
        raise CurateError(f"{where}: weighted_captions = true needs captions written with "
                          "escape_parentheses = true (these carry plain parentheses)")
    return caption


def _txt_caption(image: Path) -> str | None:
    """The caption file beside an image, as training text (one line, a BOM and prompt
    escapes gone, as curate caption writes a user's caption)."""
    txt = image.with_suffix(".txt")
    try:
        return caption_rules.person_text(txt.read_text(encoding="utf-8-sig")) or None
    except (OSError, UnicodeDecodeError):
        return None


# --- captions ----------------------------------------------------------------------


def process_caption(caption: str, ds: DatasetConfig, keep_separator: str | None, rng: random.Random) -> str:
    """sd-scripts' order: whole-caption dropout, one line (enable_wildcard), keep group,
    shuffle the rest, tag dropout."""
    if ds.caption_dropout_rate > 0 and rng.random() < ds.caption_dropout_rate:
        return ""
    if ds.enable_wildcard and "\n" in caption:  # seeded by the sample: a resumed run picks alike
        caption = rng.choice(caption.split("\n"))
    sep = ds.caption_separator
    if not (ds.shuffle_caption or ds.caption_tag_dropout_rate > 0 or keep_separator):
        return caption
    fixed, suffix = [], []
    if keep_separator and keep_separator in caption:
        fixed_part, flex_part = caption.split(keep_separator, 1)
        if keep_separator in flex_part:
            flex_part, suffix_part = flex_part.split(keep_separator, 1)
            suffix = _tags(suffix_part, sep)
        fixed, flex = _tags(fixed_part, sep), _tags(flex_part, sep)
    else:
        flex = _tags(caption, sep)
        if ds.keep_tokens > 0:
            fixed, flex = flex[:ds.keep_tokens], flex[ds.keep_tokens:]
    if ds.shuffle_caption:
        rng.shuffle(flex)
    if ds.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= ds.caption_tag_dropout_rate]
    return ", ".join(fixed + flex + suffix)


def _tags(text: str, sep: str) -> list[str]:
    return [t.strip() for t in text.split(sep) if t.strip()]


# --- loading batches ---------------------------------------------------------------


def sample_rng(seed: int, epoch: int, batch: int, slot: int) -> random.Random:
    return random.Random(f"{seed}:{epoch}:{batch}:{slot}")


def time_ids(s: Sample, flip: bool) -> list[int]:
    """SDXL size conditioning: original (h, w), crop top-left (top, left), target (h, w)."""
    left, top = s.placement.crop
    if flip:  # the crop's left edge, seen in the mirrored image
        left = s.placement.resized[0] - s.placement.bucket[0] - left
    w, h = s.placement.bucket
    return [s.size[1], s.size[0], top, left, h, w]


def mask(s: Sample, flip: bool):
    """masked_loss: the image's alpha channel, or the first channel of `<stem>_mask.png` beside
    it, placed in the bucket like the pixels, as an HxW float tensor in [0, 1]; None: no mask."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    beside = s.path.with_name(s.path.stem + "_mask.png")
    try:
        with Image.open(beside if beside.is_file() else s.path) as im:
            im = ImageOps.exif_transpose(im)
            if beside.is_file():
                m = im.convert("RGB").getchannel("R") if im.mode not in ("L", "1") else im.convert("L")
            elif im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                m = im.convert("RGBA").getchannel("A")
            else:
                return None
    except OSError as exc:
        raise CurateError(f"{beside if beside.is_file() else s.path}: cannot read the mask ({exc})") from None
    if m.size != s.size:  # a mask file drawn at another size: stretched onto the image
        m = m.resize(s.size, Image.Resampling.BILINEAR)
    m = resize_and_crop(m, s.placement)
    if flip:
        m = ImageOps.mirror(m)
    return torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)


def masks(samples: list[Sample], flips: list[bool], shape) -> "torch.Tensor":
    """[B, 1, H, W] masks of a batch; an image without one counts everywhere (ones)."""
    import torch

    out = [mask(s, f) for s, f in zip(samples, flips)]
    return torch.stack([m if m is not None else torch.ones(shape) for m in out])[:, None]


def pixels(s: Sample, flip: bool):
    """The bucket-sized image as a CHW float tensor in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import ImageOps

    try:
        image = resize_and_crop(open_image(s.path), s.placement)
    except ImageError as exc:
        raise CurateError(f"{s.path}: {exc} (changed since the run started?)") from None
    if flip:
        image = ImageOps.mirror(image)
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float().div(127.5).sub(1.0)


class LatentCache:
    """VAE latents on disk, one safetensors file per (image content, bucket, crop, flip, VAE)."""

    def __init__(self, folder: Path, vae_id: str):
        self.folder = Path(folder)
        self.vae_id = vae_id
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CurateError(f"cannot write the latent cache {self.folder}: {exc.strerror or exc}") from None

    def path(self, s: Sample, flip: bool) -> Path:
        p = s.placement
        key = f"{s.content_hash}|{p.bucket}|{p.resized}|{p.crop}|{flip}|{self.vae_id}"
        return self.folder / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".safetensors")

    def load(self, s: Sample, flip: bool):
        from safetensors.torch import load_file

        return load_file(self.path(s, flip))["latents"]


def uncached(plan: Plan, cache: LatentCache) -> list[tuple[Sample, bool]]:
    """Every (sample, flip) the run can draw whose latents are not on disk yet."""
    todo = []
    for s in (plan.samples[i] for i in sorted(plan.used_indices())):
        if not s.content_hash:
            s.content_hash = file_sha256(s.path)
        flips = (False, True) if plan.config.datasets[s.dataset].flip_aug else (False,)
        todo += [(s, f) for f in flips if not cache.path(s, f).is_file()]
    return todo


def fill_cache(todo: list[tuple[Sample, bool]], cache: LatentCache, encode, progress=None) -> None:
    """Encode and store; each file appears complete or not at all (temp file + rename)."""
    from safetensors.torch import save_file

    for s, flip in todo:
        latents = encode(pixels(s, flip)[None])[0]
        target = cache.path(s, flip)
        tmp = target.with_suffix(".part")
        save_file({"latents": latents.contiguous().cpu()}, str(tmp))
        tmp.replace(target)
        if progress:
            progress(1)


class RunData:
    """torch Dataset over the run's batches from a position on, across epochs, so one
    DataLoader (and its workers) serves the whole run. Item i is the i-th batch after
    (epoch, batch); a DataLoader with batch_size=None reads it."""

    def __init__(self, plan: Plan, cache: LatentCache | None, epoch: int, batch: int, process: int = 0):
        self.plan, self.cache, self.process = plan, cache, process
        self.start = epoch * plan.batches_per_epoch + batch
        self._order: dict[int, list[list[int]]] = {}

    def __len__(self) -> int:
        return max(self.plan.epochs * self.plan.batches_per_epoch - self.start, 0)

    def batch(self, epoch: int, b: int) -> list[int]:
        if epoch not in self._order:  # one epoch's order at a time (each worker makes its own)
            self._order = {epoch: self.plan.epoch_batches(epoch, self.process)}
        return self._order[epoch][b]

    def __getitem__(self, i: int) -> dict:
        import torch

        epoch, b = divmod(self.start + i, self.plan.batches_per_epoch)
        indices = self.batch(epoch, b)
        images, captions, ids, flips = [], [], [], []
        for slot, idx in enumerate(indices):
            s = self.plan.samples[idx]
            ds = self.plan.config.datasets[s.dataset]
            rng = sample_rng(self.plan.config.seed, epoch, b, slot)
            flip = ds.flip_aug and rng.random() < 0.5
            flips.append(flip)
            captions.append(process_caption(s.caption, ds, s.keep_separator, rng))
            ids.append(time_ids(s, flip))
            images.append(self.cache.load(s, flip) if self.cache else pixels(s, flip))
        key = "latents" if self.cache else "pixels"
        out = {key: torch.stack(images), "captions": captions, "epoch": epoch, "batch": b,
               "time_ids": torch.tensor(ids, dtype=torch.float32),
               "keys": [self.plan.samples[i].key for i in indices]}
        if self.plan.config.masked_loss:
            w, h = self.plan.samples[indices[0]].placement.bucket
            out["masks"] = masks([self.plan.samples[i] for i in indices], flips, (h, w))
        return out


def val_batches(plan: Plan, cache: LatentCache | None):
    """The held-out set in batches of one bucket each, as written (no flip, no caption dropout or
    shuffle): the same inputs at every validation."""
    import torch

    by_bucket: dict = {}
    for i in plan.val:
        by_bucket.setdefault(plan.samples[i].placement.bucket, []).append(i)
    size = plan.config.train_batch_size
    for (w, h), items in sorted(by_bucket.items()):
        for k in range(0, len(items), size):
            chunk = [plan.samples[i] for i in items[k:k + size]]
            images = [cache.load(s, False) if cache else pixels(s, False) for s in chunk]
            batch = {"latents" if cache else "pixels": torch.stack(images), "captions": [s.caption for s in chunk],
                     "time_ids": torch.tensor([time_ids(s, False) for s in chunk], dtype=torch.float32),
                     "keys": [s.key for s in chunk]}
            if plan.config.masked_loss:
                batch["masks"] = masks(chunk, [False] * len(chunk), (h, w))
            yield batch
