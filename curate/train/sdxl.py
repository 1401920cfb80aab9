"""SDXL: load the parts, condition on captions, save the result.

The parts are the well-kept library classes: diffusers' UNet2DConditionModel,
AutoencoderKL and DDPMScheduler, transformers' two CLIP text encoders and tokenizers.
`load("tiny-random")` builds the same classes with tiny configs in process, so tests
run the exact code path of a real model.

Saving writes a diffusers folder and a single-file checkpoint in the original (SGM)
key layout that ComfyUI and A1111 load; the key mapping below is diffusers' own
convert_diffusers_to_original_sdxl.py, written for any block count, and is checked in
the tests by loading the file back through diffusers' single-file loader.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from curate.errors import CurateError

MAX_TOKENS = 77
VAE_SCALE = 0.13025  # SDXL's latent scaling factor


@dataclass
class SDXL:
    unet: "torch.nn.Module"
    vae: "torch.nn.Module"
    te1: "torch.nn.Module"
    te2: "torch.nn.Module"
    tok1: object
    tok2: object

    @property
    def vae_id(self) -> str:
        """A fingerprint of the VAE weights, part of the latent cache key."""
        w = self.vae.encoder.conv_in.weight.detach().float().cpu()
        return f"{tuple(w.shape)}:{w.sum().item():.6e}:{w.abs().sum().item():.6e}:{w.flatten()[:8].tolist()}"


def noise_scheduler(v_prediction: bool = False):
    """The SDXL training schedule (as sd-scripts builds it, whatever the checkpoint says)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False,
                         prediction_type="v_prediction" if v_prediction else "epsilon")


def load(pretrained: str, config_dir: Path | None = None) -> SDXL:
    """A diffusers folder, a single-file SDXL .safetensors (configs from config_dir, else from the
    Hugging Face cache/hub), or "tiny-random"."""
    if pretrained == "tiny-random":
        return tiny_random()
    path = Path(pretrained)
    if not path.exists():
        raise CurateError(f"pretrained model not found: {path}")
    try:
        if path.is_dir():
            return _from_folder(path)
        from diffusers import StableDiffusionXLPipeline

        if config_dir is None:  # diffusers takes the SDXL configs from the Hugging Face cache or hub
            try:
                pipe = StableDiffusionXLPipeline.from_single_file(str(path))
            except Exception as exc:  # network, cache or format: all end the same way for the user
                raise CurateError(f"cannot load {path} without its configs ({_first_line(exc)}); set "
                                  "pretrained_config = a local diffusers SDXL folder (configs and "
                                  "tokenizers; weights not needed)") from None
        else:
            pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(config_dir),
                                                              local_files_only=True)
        model = SDXL(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2)
        for name in ("unet", "vae", "te1", "te2"):  # diffusers leaves absent weights on "meta"
            missing = [k for k, v in getattr(model, name).state_dict().items() if v.device.type == "meta"]
            if missing:
                raise CurateError(f"{path}: {name} weights missing from the checkpoint (e.g. {missing[0]})")
        return model
    except CurateError:
        raise
    except Exception as exc:  # whatever diffusers/transformers raise for a file that is not SDXL
        raise CurateError(f"cannot load {path} as SDXL: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _from_folder(folder: Path) -> SDXL:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    return SDXL(
        UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
        CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2"),
        CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"),
    )


def tiny_random(seed: int = 0) -> SDXL:
    """SDXL-shaped and tiny: 2 UNet levels (32, 64), context 32+48, 8x VAE, 12/10-layer CLIPs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok1, tok2 = _tiny_tokenizers()
    unet = UNet2DConditionModel(
        sample_size=32, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), cross_attention_dim=32 + 48,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 48, norm_num_groups=16,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
        layers_per_block=1, sample_size=64, scaling_factor=VAE_SCALE,
    )
    clip = dict(vocab_size=len(tok1), intermediate_size=64, num_attention_heads=4,
                max_position_embeddings=MAX_TOKENS, bos_token_id=tok1.bos_token_id,
                eos_token_id=tok1.eos_token_id, pad_token_id=tok1.pad_token_id)
    # widths differ (as 768 vs 1280 do) so diffusers' single-file loader tells the encoders apart
    te1 = CLIPTextModel(CLIPTextConfig(**clip, hidden_size=32, num_hidden_layers=12, hidden_act="quick_gelu"))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip, hidden_size=48, projection_dim=48,
                                                     num_hidden_layers=10, hidden_act="gelu"))
    return SDXL(unet, vae, te1, te2, tok1, tok2)


def full_size_random(device="cpu") -> SDXL:
    """The real SDXL base architecture (UNet 2.6B, VAE, CLIP-L, bigG) with random weights,
    built on `device`; for benchmarks (tokenizers are the tiny ones, ids fit any vocab)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok1, tok2 = _tiny_tokenizers()
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                            sample_size=1024, scaling_factor=VAE_SCALE)
        clip = dict(vocab_size=49408, max_position_embeddings=MAX_TOKENS, bos_token_id=tok1.bos_token_id,
                    eos_token_id=tok1.eos_token_id, pad_token_id=tok1.pad_token_id)
        te1 = CLIPTextModel(CLIPTextConfig(**clip, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, hidden_act="quick_gelu"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip, hidden_size=1280, intermediate_size=5120,
                                                         num_hidden_layers=32, num_attention_heads=20,
                                                         hidden_act="gelu", projection_dim=1280))
    return SDXL(unet, vae, te1, te2, tok1, tok2)


def _tiny_tokenizers():
    """Byte-level CLIP BPE with no merges: every character is a token (vocab 514)."""
    from transformers import CLIPTokenizer

    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:] + [256 + n for n in range(256 - len(bs))]
    bs += [b for b in range(256) if b not in bs]
    chars = [chr(c) for c in cs]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n")
        files = (str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"))
        tok1 = CLIPTokenizer(*files, model_max_length=MAX_TOKENS)
        tok2 = CLIPTokenizer(*files, model_max_length=MAX_TOKENS, pad_token="!")  # SDXL's TE2 pads with "!"
    return tok1, tok2


# --- conditioning ---------------------------------------------------------------------


def encode_text(model: SDXL, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [B, 77, 768+1280], pooled [B, 1280]): TE1 hidden_states[11] ++ TE2
    hidden_states[-2] (both the penultimate layer), pooled from TE2's projection."""
    ids1 = _tokens(model.tok1, captions, device)
    ids2 = _tokens(model.tok2, captions, device)
    out1 = model.te1(ids1, output_hidden_states=True)
    out2 = model.te2(ids2, output_hidden_states=True)
    context = torch.cat([out1.hidden_states[11], out2.hidden_states[-2]], dim=-1)
    return context, out2.text_embeds


def _tokens(tokenizer, captions: list[str], device) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                     return_tensors="pt").input_ids.to(device)


# --- saving ---------------------------------------------------------------------------


def save_diffusers(model: SDXL, folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A diffusers folder (unet, vae, text_encoder[_2], tokenizer[_2], scheduler, model_index.json)
    that transformers 4.x (sd-scripts pins 4.54) and 5.x both load with every weight: text
    encoder keys keep the `text_model.` prefix (5.x's flattened CLIPTextModel drops it, 4.x
    would silently re-initialise the encoder without it) and each tokenizer folder holds
    vocab.json + merges.txt beside tokenizer.json."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per file otherwise; curate shows its own
    folder = Path(folder)
    parts = {"unet": model.unet, "vae": model.vae, "text_encoder": model.te1, "text_encoder_2": model.te2}
    for name, part in parts.items():
        state = {k: v.to(dtype) for k, v in part.state_dict().items()}
        if name.startswith("text_encoder"):
            state = {_text_model(k): v for k, v in state.items()}
        part.save_pretrained(folder / name, safe_serialization=True, state_dict=state)
    for name, tok in (("tokenizer", model.tok1), ("tokenizer_2", model.tok2)):
        _save_tokenizer(tok, folder / name)
    noise_scheduler().save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
             "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


def _save_tokenizer(tok, folder: Path) -> None:
    """tokenizer.json (fast) and the vocab.json + merges.txt a slow (4.x) CLIPTokenizer reads."""
    tok.save_pretrained(folder)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        backend.model.save(str(folder))  # a BPE model writes exactly those two files


MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"  # SGM layout, as sd-scripts


def modelspec(title: str, resolution: tuple[int, int] = (1024, 1024), v_prediction: bool = False) -> dict:
    """The SAI ModelSpec keys sd-scripts writes into a full SDXL checkpoint (library/sai_model_spec.py),
    which UIs and model sites read."""
    import datetime

    from curate import __version__

    return {"modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "stable-diffusion-xl-v1-base",
            "modelspec.implementation": MODELSPEC_IMPLEMENTATION, "modelspec.title": title,
            "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
            "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
            "modelspec.prediction_type": "v" if v_prediction else "epsilon",
            "modelspec.implementation_version": f"curate/{__version__}"}


def save_single_file(model: SDXL, path: Path, dtype: torch.dtype = torch.float32,
                     metadata: dict | None = None) -> Path:
    """One .safetensors in the original SDXL layout (model.diffusion_model.*, first_stage_model.*,
    conditioner.embedders.0.transformer.*, conditioner.embedders.1.model.*), with ModelSpec
    metadata (`metadata`, default: modelspec(file stem))."""
    from safetensors.torch import save_file

    state = {}
    state.update({"model.diffusion_model." + k: v for k, v in unet_to_original(model.unet).items()})
    state.update({"first_stage_model." + k: v for k, v in vae_to_original(model.vae).items()})
    state.update({"conditioner.embedders.0.transformer." + _text_model(k): v
                  for k, v in model.te1.state_dict().items() if not k.endswith("position_ids")})
    state.update({"conditioner.embedders.1.model." + k: v for k, v in te2_to_openclip(model.te2).items()})
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    save_file(state, str(tmp), metadata={"format": "pt", **(metadata or modelspec(path.stem))})
    tmp.replace(path)
    return path


def unet_to_original(unet) -> dict:
    """diffusers UNet state dict -> SGM `model.diffusion_model` keys (without the prefix)."""
    cfg = unet.config
    per = cfg.layers_per_block + 1  # input/output blocks per level (resnets + a sampler slot)
    prefixes = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
                ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
                ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
                ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
                ("mid_block.resnets.1.", "middle_block.2.")]
    levels = len(cfg.block_out_channels)
    for i in range(levels):
        for j in range(cfg.layers_per_block):
            prefixes.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{i * per + j + 1}.0."))
            prefixes.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{i * per + j + 1}.1."))
        if i < levels - 1:
            prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * per}.0.op."))
        has_attn = "CrossAttn" in cfg.up_block_types[i]
        for j in range(per):
            prefixes.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * per + j}.0."))
            prefixes.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * per + j}.1."))
        if i < levels - 1:
            slot = 2 if has_attn else 1  # after the resnet (and the attention, if any)
            prefixes.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * per + per - 1}.{slot}."))
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
              ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
    out = {}
    for key, value in unet.state_dict().items():
        for hf, sd in prefixes:
            if key.startswith(hf):
                rest = key[len(hf):]
                if ".resnets." in hf:  # layer names inside a resnet differ too
                    rest = next((new + rest[len(old):] for old, new in resnet if rest.startswith(old + ".")), rest)
                key = sd + rest
                break
        out[key] = value
    return out


def vae_to_original(vae) -> dict:
    """diffusers AutoencoderKL state dict -> SGM `first_stage_model` keys (without the prefix)."""
    levels = len(vae.config.block_out_channels)
    per = vae.config.layers_per_block
    prefixes = [("encoder.mid_block.attentions.0.", "encoder.mid.attn_1."),
                ("decoder.mid_block.attentions.0.", "decoder.mid.attn_1.")]
    for part in ("encoder", "decoder"):
        prefixes += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.") for j in range(2)]
        prefixes.append((f"{part}.conv_norm_out.", f"{part}.norm_out."))
    for i in range(levels):
        prefixes += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(per)]
        up = levels - 1 - i  # the original numbers decoder levels from the bottom
        prefixes += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.") for j in range(per + 1)]
        if i < levels - 1:
            prefixes.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
            prefixes.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample."))
    attn = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
    out = {}
    for key, value in vae.state_dict().items():
        new = _swap_prefix(key, prefixes).replace("conv_shortcut", "nin_shortcut")
        if ".attn_1." in new:
            for hf, sd in attn:
                new = new.replace(".attn_1." + hf, ".attn_1." + sd)
            if new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
                value = value.reshape(*value.shape, 1, 1)  # linear -> 1x1 conv, as the original
        out[new] = value
    return out


_OPENCLIP = [("text_model.encoder.layers.", "transformer.resblocks."), ("layer_norm1", "ln_1"),
             ("layer_norm2", "ln_2"), (".fc1.", ".c_fc."), (".fc2.", ".c_proj."), (".self_attn", ".attn"),
             ("text_model.final_layer_norm.", "ln_final."),
             ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
             ("text_model.embeddings.position_embedding.weight", "positional_embedding")]


def te2_to_openclip(te2) -> dict:
    """transformers CLIPTextModelWithProjection -> OpenCLIP keys (q/k/v fused into in_proj)."""
    out, qkv = {}, {}
    for key, value in te2.state_dict().items():
        if key.endswith("position_ids"):
            continue
        m = re.match(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()  # OpenCLIP multiplies x @ P
            continue
        for hf, oc in _OPENCLIP:
            key = key.replace(hf, oc)
        out[key] = value
    for (layer, kind), parts in qkv.items():
        for hf, oc in _OPENCLIP:
            layer = layer.replace(hf, oc)
        out[f"{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _text_model(key: str) -> str:
    # transformers >= 5.6 flattened CLIPTextModel; 4.x and the original layout keep `text_model.`
    return key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key


def _swap_prefix(key: str, prefixes: list[tuple[str, str]]) -> str:
    for hf, sd in prefixes:
        if key.startswith(hf):
            return sd + key[len(hf):]
    return key
