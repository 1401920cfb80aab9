"""WD v3 tagger models: find, load, label, preprocess. Used by curate.dataset.tag.

A tagger is a folder in the Hugging Face hub layout SmilingWolf's taggers use:
`config.json` (timm: architecture, num_classes, model_args, pretrained_cfg),
`model.safetensors`, `selected_tags.csv` (tag_id,name,category,count; category
9 rating, 0 general, 4 character) and, on the hub, `model.onnx`. A local folder or
a hub id (fetched with huggingface_hub, which honours HF_HUB_OFFLINE).

Loading goes through timm directly, not transformers' TimmWrapper: these are timm
checkpoints, timm's own config parser (`load_model_config_from_path`) reads them,
`create_model` builds the exact architecture, and the bare nn.Module is what
channels_last / autocast / torch.compile want; the wrapper would add a second
config layer (and transformers 5.x API churn) for nothing. The tiny test models and
the real ones take the same path. A folder with `model.onnx` but no
`model.safetensors` (the v2 taggers) runs on onnxruntime.

Preprocessing follows SmilingWolf's reference code: the wdv3-timm example
(github.com/SmilingWolf/wdv3-timm, wdv3_timm.py: `pil_ensure_rgb`, `pil_pad_square`,
timm `create_transform(resolve_data_config(pretrained_cfg))`, then
`inputs[:, [2, 1, 0]]` RGB->BGR) and the wd-tagger space (huggingface.co/spaces/
SmilingWolf/wd-tagger, app.py `prepare_image`: the ONNX models take NHWC float
BGR 0..255, bicubic resize; `mcut_threshold`). Alpha on white is done by
images.open_image; `prepare` pads to a centred white square and does timm's eval
resize + centre crop on it; `normalize` (on the device) does ToTensor + Normalize
and the BGR swap.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from curate.errors import CurateError

RATING, CHARACTER = 9, 4  # selected_tags.csv categories; 0 (general) and any other code are general tags
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
FILES = ("config.json", "model.safetensors", "model.onnx", "selected_tags.csv")


# --- labels -----------------------------------------------------------------------


@dataclass
class Labels:
    """One entry per model output. Empty names are placeholders: kept as a slot, never emitted."""

    names: list[str]
    categories: np.ndarray  # int codes; -1 for placeholders

    def __len__(self) -> int:
        return len(self.names)

    def index(self, code: int) -> np.ndarray:
        return np.flatnonzero(self.categories == code)

    @property
    def general(self) -> np.ndarray:
        # Danbooru's other categories (artist 1, copyright 3, meta 5) are not in the WD
        # lists; should a list carry them, they are descriptive tags like general ones.
        return np.flatnonzero((self.categories >= 0) & (self.categories != RATING)
                              & (self.categories != CHARACTER))

    def without_placeholders(self) -> "Labels":
        keep = self.categories >= 0
        return Labels([n for n, k in zip(self.names, keep) if k], self.categories[keep])


def read_labels(path: Path) -> Labels:
    """selected_tags.csv -> Labels. Tolerates BOM, CRLF, blank lines, stray spaces, quotes in names."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise CurateError(f"cannot read tag list {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CurateError(f"tag list {path} is not UTF-8 text") from None
    rows = csv.reader(io.StringIO(text))
    header = [h.strip().lower() for h in next(rows, [])]
    if "name" not in header or "category" not in header:
        raise CurateError(f"tag list {path} has no name,category header (got {','.join(header)[:80]!r})")
    i_name, i_cat = header.index("name"), header.index("category")
    names, cats = [], []
    for line, row in enumerate(rows, start=2):
        if not row:  # a truly empty line is not a label slot
            continue
        name = row[i_name].strip() if len(row) > i_name else ""
        cat = row[i_cat].strip() if len(row) > i_cat else ""
        if not name:  # `,,,`: a slot with no label; keeps the later indices aligned
            names.append("")
            cats.append(-1)
            continue
        try:
            cats.append(int(float(cat)))
        except ValueError:
            raise CurateError(f"tag list {path} line {line}: category {cat!r} is not a number") from None
        names.append(name)
    if not any(c >= 0 for c in cats):
        raise CurateError(f"tag list {path} has no labels")
    return Labels(names, np.asarray(cats, dtype=np.int64))


def fit_labels(labels: Labels, n_outputs: int, where: str) -> Labels:
    """Labels aligned with the model's outputs, or a one-line error."""
    if len(labels) == n_outputs:
        return labels
    dense = labels.without_placeholders()
    if len(dense) == n_outputs:
        return dense
    raise CurateError(f"{where}: selected_tags.csv has {len(dense)} labels but the model has "
                      f"{n_outputs} outputs (wrong tag list for this model?)")


# --- finding the files ---------------------------------------------------------------


@dataclass
class ModelFiles:
    folder: Path
    model_id: str  # what provenance shows: the hub id, or the folder's absolute path
    revision: str | None = None  # hub commit
    present: set = field(default_factory=set)


def locate(spec: str) -> ModelFiles:
    """A local folder, or a hub id downloaded (or found in the cache) by huggingface_hub."""
    path = Path(spec).expanduser()
    if path.is_dir():
        folder = path.resolve()
        return ModelFiles(folder, str(folder), None, {f for f in FILES if (folder / f).is_file()})
    if path.exists():
        raise CurateError(f"--model {spec}: a model folder is expected, this is a file")
    if not HUB_ID.match(spec) or spec.startswith((".", "~")):
        raise CurateError(f"model folder not found: {spec}")
    return _from_hub(spec)


def _from_hub(repo: str) -> ModelFiles:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:
        raise CurateError(f"{repo} is not a folder, and huggingface_hub is not installed to fetch it") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the hub"

    def get(name: str, required: bool) -> Path | None:
        try:
            return Path(hf_hub_download(repo, name))
        except LocalEntryNotFoundError:  # offline, or the hub unreachable, and not in the cache
            if required:
                raise CurateError(f"model not found: {repo} is no local folder, and its {name} is not in "
                                  f"the local Hugging Face cache{' (HF_HUB_OFFLINE is set)' if offline else ''}") from None
            return None
        except EntryNotFoundError:  # the repository has no such file
            if required:
                raise CurateError(f"{repo} has no {name}: not a WD tagger repository?") from None
            return None
        except Exception as exc:  # unknown repository, gated, network: one line
            text = str(exc).splitlines()[0][:160] if str(exc) else ""
            raise CurateError(f"model not found: {repo} is no local folder, and the hub download failed "
                              f"({type(exc).__name__}: {text})") from None

    tags = get("selected_tags.csv", True)
    if get("model.safetensors", False) is not None:
        get("config.json", True)
    elif get("model.onnx", False) is None:
        raise CurateError(f"{repo}: neither model.safetensors nor model.onnx found in {where}")
    folder = tags.parent  # <cache>/models--owner--name/snapshots/<commit>/
    return ModelFiles(folder, repo, folder.name, {f for f in FILES if (folder / f).is_file()})


def weights_file(files: ModelFiles) -> str:
    """Which weights to run (safetensors on torch first, else ONNX); errors for an incomplete folder."""
    if "selected_tags.csv" not in files.present:
        raise CurateError(f"{files.model_id}: no selected_tags.csv in {files.folder}")
    for name in ("model.safetensors", "model.onnx"):
        if name in files.present:
            return name
    raise CurateError(f"{files.model_id}: no model.safetensors or model.onnx in {files.folder}")


def fingerprint(files: ModelFiles, weights: str) -> str:
    """sha256 over the weights and the tag list: the same model under another path is the same model."""
    h = hashlib.sha256()
    for name in (weights, "selected_tags.csv"):
        with open(files.folder / name, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:16]


# --- the loaded tagger -----------------------------------------------------------------


@dataclass
class Tagger:
    backend: str  # "timm" | "onnx"
    model: object  # torch nn.Module or onnxruntime.InferenceSession
    labels: Labels
    size: int  # square input side
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    model_id: str = ""
    revision: str | None = None
    batch: int | None = None  # an ONNX export's fixed batch dimension (None: any batch size)


def load(spec: str | ModelFiles, device: str = "cpu") -> Tagger:
    """Find (unless given located files) and load a tagger; every failure is a one-line CurateError."""
    files = spec if isinstance(spec, ModelFiles) else locate(spec)
    weights = weights_file(files)
    labels = read_labels(files.folder / "selected_tags.csv")
    if weights == "model.safetensors":
        tagger = _load_timm(files, labels, device)
    else:
        tagger = _load_onnx(files, labels, device)
    tagger.model_id, tagger.revision = files.model_id, files.revision
    return tagger


def _load_timm(files: ModelFiles, labels: Labels, device: str) -> Tagger:
    import timm
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from timm.data import resolve_data_config
    from timm.models._hub import (
        load_model_config_from_path,  # timm's parser of hub config.json
    )

    where = str(files.model_id)
    if "config.json" not in files.present:
        raise CurateError(f"{where}: model.safetensors without config.json (timm config) in {files.folder}")
    try:
        pretrained_cfg, arch, model_args = load_model_config_from_path(files.folder)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise CurateError(f"{where}: config.json is not a timm model config ({type(exc).__name__}: {exc})") from None
    if not timm.is_model(arch):
        raise CurateError(f"{where}: config.json names architecture {arch!r}, which this timm does not know")
    try:
        model = timm.create_model(arch, pretrained=False, pretrained_cfg=pretrained_cfg, **model_args)
    except Exception as exc:
        raise CurateError(f"{where}: cannot build {arch} from config.json ({type(exc).__name__}: {exc})") from None
    try:
        state = load_file(str(files.folder / "model.safetensors"))
        model.load_state_dict(state, strict=True)
    except (SafetensorError, OSError) as exc:
        raise CurateError(f"{where}: model.safetensors is unreadable ({str(exc).splitlines()[0][:160]})") from None
    except RuntimeError as exc:  # missing / unexpected / mis-shaped keys
        raise CurateError(f"{where}: model.safetensors does not fit {arch} "
                          f"({str(exc).splitlines()[0][:120]} ...)") from None
    model.eval().requires_grad_(False).to(device)
    data = resolve_data_config(model=model)  # timm's own reading of pretrained_cfg
    h, w = data["input_size"][1:]
    if h != w:
        raise CurateError(f"{where}: non-square input {w}x{h} is not a WD tagger layout")
    labels = fit_labels(labels, model.num_classes, where)
    return Tagger("timm", model, labels, int(h), data.get("interpolation", "bicubic"),
                  float(data.get("crop_pct") or 1.0), tuple(data["mean"]), tuple(data["std"]))


def _load_onnx(files: ModelFiles, labels: Labels, device: str) -> Tagger:
    try:
        import onnxruntime as ort
    except ImportError:
        raise CurateError(f"{files.model_id} is an ONNX model: install curate[onnx] (onnxruntime)") from None
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(str(files.folder / "model.onnx"), providers=providers)
    except Exception as exc:
        raise CurateError(f"{files.model_id}: model.onnx is unreadable ({str(exc).splitlines()[0][:160]})") from None
    inp = session.get_inputs()[0]
    shape = inp.shape  # the WD ONNX models take [N, H, W, 3] BGR 0..255
    if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
        raise CurateError(f"{files.model_id}: model.onnx input {shape} is not the WD layout [N, S, S, 3]")
    if inp.type != "tensor(float)":
        raise CurateError(f"{files.model_id}: model.onnx input is {inp.type}; the WD layout takes float32 pixels")
    # many exports (the v2 family, re-exports) fix the batch dimension, mostly at 1: it then
    # sets the batch size; a symbolic or unknown one (str / None / -1) takes any
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    n_out = session.get_outputs()[0].shape[-1]
    if not isinstance(n_out, int):  # a symbolic width: ask the model once
        probe = np.full((batch or 1, shape[1], shape[2], 3), 255, dtype=np.float32)
        try:
            n_out = session.run(None, {inp.name: probe})[0].shape[-1]
        except Exception as exc:
            raise CurateError(f"{files.model_id}: model.onnx does not run on a {list(probe.shape)} input "
                              f"({str(exc).splitlines()[0][:160]})") from None
    labels = fit_labels(labels, n_out, str(files.model_id))
    return Tagger("onnx", session, labels, int(shape[1]), batch=batch)


# --- preprocessing ------------------------------------------------------------------------


def draft_size(tagger_size: int, crop_pct: float = 1.0) -> tuple[int, int]:
    """JPEG draft request: decode at the smallest DCT scale that still leaves >= the model's size."""
    s = math.floor(tagger_size / crop_pct)
    return (s, s)


def prepare(img, size: int, interpolation: str = "bicubic", crop_pct: float = 1.0) -> np.ndarray:
    """RGB PIL image -> uint8 HWC RGB, `size` square, as the taggers were trained.

    Pad to a centred white square (wdv3-timm `pil_pad_square`), then timm's eval
    transform on that square: resize to floor(size / crop_pct), centre crop to size.
    """
    from PIL import Image

    w, h = img.size
    px = max(w, h)
    if (w, h) != (px, px):
        canvas = Image.new("RGB", (px, px), (255, 255, 255))
        canvas.paste(img, ((px - w) // 2, (px - h) // 2))
        img = canvas
    scale = math.floor(size / crop_pct)
    if px != scale:
        img = img.resize((scale, scale), _RESAMPLE[interpolation])
    if scale != size:  # torchvision CenterCrop's offsets
        off = int(round((scale - size) / 2.0))
        img = img.crop((off, off, off + size, off + size))
    return np.array(img, dtype=np.uint8)


_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1, "box": 4, "hamming": 5}


def normalize(batch, mean, std):
    """uint8 NCHW RGB (on the device) -> float NCHW BGR: timm ToTensor + Normalize, then the BGR swap."""
    import torch

    m = torch.tensor(mean, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1)
    x = batch.to(torch.float32).div_(255).sub_(m).div_(s)
    return x[:, [2, 1, 0]]
