"""Image embeddings and the quality head on them: shared by `curate score` (dataset) and
`curate artists --like` (metadata).

A model is a folder, local or a Hugging Face hub id (fetched with huggingface_hub,
which honours HF_HUB_OFFLINE; both then take the same loading code), holding:

  - a CLIP vision backbone in transformers' layout (config.json, model.safetensors,
    preprocessor_config.json), loaded with CLIPVisionModelWithProjection: the image
    embedding the community's anime quality predictors are trained on (LAION's
    improved-aesthetic-predictor and waifu-scorer on CLIP ViT-L/14 image_embeds);
  - optionally `curate_score.json`: {"backbone": "." or another folder / hub id,
    "head": "head.safetensors", "activation": "none" | "relu" | "gelu",
    "normalize": true} and the head: Linear layers in order, keys
    `<prefix><index>.weight` / `.bias` (the improved-aesthetic-predictor's
    `layers.0 .. layers.7` state dict converted to safetensors loads as is; its
    Dropouts have no weights, and it has no activations: "none").

`embed` returns L2-normalized image embeddings (what those heads take), `score` the
head's first output per image. Batched; CUDA when present; torch and transformers
are imported only here, when a model is loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from curate.errors import CurateError

CONFIG = "curate_score.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ACTIVATIONS = ("none", "relu", "gelu")


def resolve(model: str | Path) -> Path:
    """A local folder as is; a hub id downloaded (or found in the cache) to a folder."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    if p.exists() or not HUB_ID.match(str(model)):
        raise CurateError(f"--model {model}: not a folder, nor a Hugging Face hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as exc:  # offline, unknown repo, no access: one line
        raise CurateError(f"--model {model}: cannot fetch from the hub: {str(exc).splitlines()[0][:200]}") from None


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CurateError(f"--device {device}: no CUDA device is available to torch here")
    if device != "cpu" and not device.startswith("cuda"):
        raise CurateError(f"--device must be cpu, cuda or auto, got {device!r}")
    return device


@dataclass
class Embedder:
    model_id: str
    folder: Path
    device: str
    backbone: object = None
    processor: object = None
    head: list = field(default_factory=list)  # [(weight, bias)] as torch tensors on the device
    activation: str = "none"
    normalize: bool = True

    def _pixels(self, images):
        import torch

        px = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return px.to(self.device, dtype=torch.float32)

    def embed(self, images) -> np.ndarray:
        """PIL images -> L2-normalized image embeddings (n, d) float32."""
        import torch

        with torch.inference_mode():
            out = self.backbone(pixel_values=self._pixels(images)).image_embeds.float()
            if self.normalize:
                out = out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return out.cpu().numpy().astype(np.float32)

    def score(self, images) -> np.ndarray:
        """PIL images -> the head's first output per image (n,) float32."""
        if not self.head:
            raise CurateError(f"{self.model_id}: no quality head ({CONFIG} names none)")
        return self.head_scores(self.embed(images))

    def head_scores(self, emb: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        act = {"none": lambda x: x, "relu": F.relu, "gelu": F.gelu}[self.activation]
        with torch.inference_mode():
            x = torch.from_numpy(np.asarray(emb, np.float32)).to(self.device)
            for k, (w, b) in enumerate(self.head):
                x = F.linear(x, w, b)
                if k < len(self.head) - 1:
                    x = act(x)
        return x[:, 0].float().cpu().numpy()


def _read_config(folder: Path) -> dict:
    f = folder / CONFIG
    if not f.is_file():
        return {}
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CurateError(f"{f}: not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise CurateError(f"{f}: expected a JSON object")
    return cfg


def _head(path: Path, device: str) -> list:
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:
        raise CurateError(f"{path}: cannot read the head: {str(exc).splitlines()[0][:200]}") from None
    layers = {}
    for name, t in state.items():
        m = re.match(r"^(.*?)(\d+)\.(weight|bias)$", name)
        if m:
            layers.setdefault(int(m.group(2)), {})[m.group(3)] = t.float().to(device)
    out = [(layers[k]["weight"], layers[k].get("bias")) for k in sorted(layers) if "weight" in layers[k]]
    if not out or any(w.ndim != 2 for w, _ in out):
        raise CurateError(f"{path}: no Linear layers (<prefix><n>.weight) in the head")
    return out


def load(model: str | Path, device: str = "auto", need_head: bool = False) -> Embedder:
    """The embedder (and head) a model folder or hub id describes."""
    folder = resolve(model)
    cfg = _read_config(folder)
    bb = cfg.get("backbone", ".")
    bb_folder = folder if bb in (".", "", None) else (folder / bb if (folder / bb).is_dir() else resolve(bb))
    activation = cfg.get("activation", "none")
    if activation not in ACTIVATIONS:
        raise CurateError(f"{folder / CONFIG}: activation must be one of {', '.join(ACTIVATIONS)}")
    if need_head and not cfg.get("head"):
        raise CurateError(f"--model {model}: no quality head ({CONFIG} with \"head\" is needed by curate score)")
    device = resolve_device(device)
    try:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        backbone = CLIPVisionModelWithProjection.from_pretrained(str(bb_folder)).to(device).eval()
        processor = CLIPImageProcessor.from_pretrained(str(bb_folder))
    except (OSError, ValueError) as exc:
        raise CurateError(f"--model {model}: cannot load a CLIP vision backbone from {bb_folder}: "
                          f"{str(exc).splitlines()[0][:200]}") from None
    head = _head(folder / cfg["head"], device) if cfg.get("head") else []
    if head and head[0][0].shape[1] != backbone.config.projection_dim:
        raise CurateError(f"--model {model}: the head takes {head[0][0].shape[1]} values, "
                          f"the backbone gives {backbone.config.projection_dim}")
    return Embedder(str(model), folder, device, backbone, processor, head, activation, bool(cfg.get("normalize", True)))
