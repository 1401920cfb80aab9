"""LoRA / LyCORIS networks on SDXL, with the module names kohya's sd-scripts gives them.

The modules are LyCORIS' own (`lycoris-lora`: LoCon for lora/locon, LoHa, LoKr); this file
only chooses which layers they wrap and what they are called, so a file curate writes has
the keys sd-scripts writes and loads wherever those load (diffusers, ComfyUI, A1111):

- which layers: sd-scripts' networks/lora.py targets: every Linear and 1x1 Conv2d inside a
  Transformer2DModel; with conv layers on (locon/loha/lokr, or lora with conv_dim), also
  the layers of ResnetBlock2D, Downsample2D and Upsample2D (3x3 convs get conv_dim);
  in the text encoders, those inside CLIPAttention and CLIPMLP.
- names: sd-scripts trains SDXL on the original (SGM) UNet, so a name is the SGM path
  (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), which the diffusers UNet
  reaches through sdxl.unet_to_original's mapping; text encoders keep transformers' names
  with the `text_model.` prefix (`lora_te1_text_model_encoder_layers_0_self_attn_q_proj`).
"""

from __future__ import annotations

import torch

from curate.errors import CurateError
from curate.train import sdxl

ALGOS = ("lora", "locon", "loha", "lokr")
UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
PREFIXES = {"unet": "lora_unet", "te1": "lora_te1", "te2": "lora_te2"}


def _algo_class(algo: str):
    from lycoris.modules import LoConModule, LohaModule, LokrModule

    return {"lora": LoConModule, "locon": LoConModule, "loha": LohaModule, "lokr": LokrModule}[algo]


def sgm_module_names(unet) -> dict[str, str]:
    """diffusers module path -> SGM module path, from the checkpoint key mapping."""
    keys = list(unet.state_dict().keys())
    original = list(sdxl.unet_to_original(unet).keys())
    names = {}
    for key, sgm in zip(keys, original):
        module, _, param = key.rpartition(".")
        names[module] = sgm[: -len(param) - 1]
    return names


def targets(model: sdxl.SDXL, text_encoders: bool = True, conv: bool = False) -> dict:
    """kohya name -> (part, layer, is_3x3_conv) for the layers a network wraps."""
    parts = [("unet", model.unet, UNET_TARGETS + (UNET_CONV_TARGETS if conv else ()))]
    if text_encoders:
        parts += [("te1", model.te1, TE_TARGETS), ("te2", model.te2, TE_TARGETS)]
    out = {}
    for part, root, classes in parts:
        rename = sgm_module_names(root) if part == "unet" else None
        for block_name, block in root.named_modules():
            if type(block).__name__ not in classes:
                continue
            for child_name, layer in block.named_modules():
                if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                    continue
                path = f"{block_name}.{child_name}" if child_name else block_name
                is_3x3 = isinstance(layer, torch.nn.Conv2d) and layer.kernel_size != (1, 1)
                if is_3x3 and not conv:
                    continue  # Transformer2DModel's proj_in/out are 1x1 (or Linear) in SDXL
                path = rename[path] if rename else sdxl._text_model(path)
                out[f"{PREFIXES[part]}_{path.replace('.', '_')}"] = (part, layer, is_3x3)
    return out


class Network(torch.nn.ModuleDict):
    """LyCORIS modules keyed by kohya name: `state_dict()` is the file's tensors as they are.
    Base weights are untouched; `attach()` routes the wrapped layers' forward through the
    modules (bypass mode: x -> base(x) + up(down(x)) * alpha/dim * multiplier)."""

    def __init__(self, model: sdxl.SDXL, algo: str = "lora", dim: int = 16, alpha: float = 1.0,
                 conv_dim: int = 0, conv_alpha: float = 1.0, dropout: float = 0.0,
                 text_encoders: bool = True, seed: int = 0):
        super().__init__()
        if algo not in ALGOS:
            raise CurateError(f"network must be one of {', '.join(ALGOS)}, not {algo!r}")
        self.algo, self.dim, self.alpha, self.dropout = algo, dim, alpha, dropout
        # sd-scripts' lora wraps 3x3 convs only when conv_dim is set; LyCORIS' algos always do
        self.conv_dim = conv_dim if algo == "lora" else (conv_dim or dim)
        self.conv_alpha = conv_alpha if conv_dim else alpha
        cls = _algo_class(algo)
        with torch.random.fork_rng(devices=[]):  # the init follows the seed, not the caller's RNG
            torch.manual_seed(seed)
            for name, (part, layer, is_3x3) in targets(model, text_encoders, self.conv_dim > 0).items():
                d, a = (self.conv_dim, self.conv_alpha) if is_3x3 else (dim, alpha)
                module = cls(name, layer, 1.0, d, a, dropout=dropout, bypass_mode=True)
                self[name] = module.to(layer.weight.device)
        self.applied = False

    def attach(self) -> "Network":
        for module in self.values():
            module.apply_to()
        self.applied = True
        return self

    def detach(self) -> None:
        for module in self.values():
            module.restore()
        self.applied = False

    def set_multiplier(self, multiplier: float) -> None:
        for module in self.values():
            module.multiplier = multiplier

    @property
    def trains_text(self) -> bool:
        return any(not name.startswith("lora_unet_") for name in self)

    def param_groups(self, unet_lr: float, te_lr: float) -> list[dict]:
        groups = {"unet": [], "te": []}
        for name, module in self.items():
            groups["unet" if name.startswith("lora_unet_") else "te"].extend(module.parameters())
        return [{"params": ps, "lr": lr} for (key, ps), lr in zip(groups.items(), (unet_lr, te_lr)) if ps]

    def load_file(self, path) -> None:
        """Start from an existing network file (network_weights): same algorithm and sizes."""
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            raise CurateError(f"cannot read network_weights {path}: {sdxl._first_line(exc)}") from None
        mine = self.state_dict()
        missing = sorted(set(mine) - set(state))
        extra = sorted(set(state) - set(mine))
        if missing or extra:
            raise CurateError(f"network_weights {path} does not fit this network ({len(missing)} keys missing, "
                              f"{len(extra)} unexpected, e.g. {(missing or extra)[0]}): same network, "
                              "network_dim, conv_dim and network_train_unet_only as when it was trained?")
        for key, value in state.items():
            if value.shape != mine[key].shape:
                raise CurateError(f"network_weights {path}: {key} has shape {tuple(value.shape)}, this network "
                                  f"{tuple(mine[key].shape)} (network_dim / conv_dim differ)")
        self.load_state_dict({k: v.to(mine[k].dtype) for k, v in state.items()})


def from_config(model: sdxl.SDXL, config, plan=None) -> Network:
    """The network a train config asks for, applied to `model`, with the file metadata of the
    run (`plan`: the data, for ss_tag_frequency and counts). The network's modules train (dropout
    on) only while the part that runs and the UNet both do: off while sampling or validating."""
    from curate.train import lora_file

    text = not config.network_train_unet_only and _te_lr(config) > 0
    net = Network(model, config.network, config.network_dim, config.network_alpha, config.conv_dim,
                  config.conv_alpha, config.network_dropout, text_encoders=text, seed=config.seed)
    if config.network_weights:
        net.load_file(config.network_weights)
    net.metadata = lora_file.train_metadata(config, plan, 0, 0) if plan is not None else {}
    for part in (model.unet, model.te1, model.te2):  # (sampling and validation put the UNet in eval)
        part.register_forward_pre_hook(lambda module, args: net.train(module.training and model.unet.training) and None)
    return net.attach()


def check_resume(net: Network, checkpoint) -> None:
    """Before accelerate loads a checkpoint into this network: same modules and shapes, else
    one line (sd-scripts shows a screen of size-mismatch errors: kohya-ss/sd-scripts#789)."""
    from pathlib import Path

    from safetensors import safe_open

    saved = Path(checkpoint) / "model.safetensors"
    if not saved.is_file():
        return  # (a .bin checkpoint: accelerate's own error)
    with safe_open(str(saved), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    mine = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    if shapes != mine:
        bad = next((k for k in mine if shapes.get(k) != mine[k]), None) or next(iter(set(shapes) - set(mine)))
        raise CurateError(f"{checkpoint} was saved by another network or a full fine-tune ({bad}: "
                          f"{shapes.get(bad, 'absent')} there, {mine.get(bad, 'absent')} now); resume with the "
                          "network settings it was trained with (network, network_dim, conv_dim, "
                          "network_train_unet_only), or start a new output_dir")


def unet_lr(config) -> float:
    return config.network_lr if config.network_lr is not None else config.learning_rate


def _te_lr(config) -> float:
    return config.text_encoder_lr if config.text_encoder_lr is not None else unet_lr(config)


def param_groups(net: Network, config) -> list[dict]:
    return net.param_groups(unet_lr(config), _te_lr(config))


def rank_sums(model: sdxl.SDXL) -> dict:
    """Sum of (fan_in + fan_out) over the layers a network can wrap, per kind: a LoRA of rank r
    on a kind has r x this many parameters (LoHa twice that). Counted on any device, meta too."""
    sums = {"unet_attn": 0, "unet_resnet": 0, "unet_conv3x3": 0, "te1": 0, "te2": 0}
    attn = set(targets(model, False, conv=False))
    for name, (part, layer, is_3x3) in targets(model, True, conv=True).items():
        kind = part if part != "unet" else "unet_conv3x3" if is_3x3 else "unet_attn" if name in attn else "unet_resnet"
        sums[kind] += layer.weight[0].numel() + layer.weight.shape[0]
    return sums
