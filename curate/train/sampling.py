"""Sample images during training, in sd-scripts' prompt syntax.

A prompt line (a `sample_prompts` list entry, or a line of a .txt file; `#` starts a comment):

    1girl, solo, halo --n lowres, bad anatomy --w 832 --h 1216 --l 5 --s 25 --d 42 --ss euler

--n negative prompt, --w/--h width/height (rounded down to a multiple of 8), --l CFG scale,
--s steps, --d seed, --ss sampler. A .toml file is sd-scripts' `[prompt]` defaults plus
`[[prompt.subset]]` entries, a .json file a list of lines or of objects with the same names
sd-scripts uses (prompt, negative_prompt, width, height, scale, sample_steps, seed,
sample_sampler). Left out: the config's sample_* keys (the recipe card's Euler a, 25 steps,
CFG 5, its negative prompt), the training resolution, seed + prompt index.

Each image carries its prompt and settings in PNG text (A1111's `parameters`, which UIs
read, and `curate` as JSON); each sampling point also writes a contact sheet.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from curate.errors import CurateError

SAMPLER_NAMES = {"euler_a": "Euler a", "euler": "Euler", "dpm++_2m": "DPM++ 2M"}
ALIASES = {"k_euler_a": "euler_a", "k_euler": "euler", "dpmsolver++": "dpm++_2m", "k_dpm++_2m": "dpm++_2m"}
_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "l": "scale", "s": "sample_steps",
            "d": "seed", "ss": "sample_sampler"}


@dataclass
class Prompt:
    prompt: str
    negative_prompt: str
    width: int
    height: int
    scale: float
    steps: int
    seed: int
    sampler: str

    def parameters(self) -> str:
        """A1111's `parameters` text, which image viewers and UIs read back."""
        return (f"{self.prompt}\nNegative prompt: {self.negative_prompt}\nSteps: {self.steps}, "
                f"Sampler: {SAMPLER_NAMES[self.sampler]}, CFG scale: {self.scale:g}, Seed: {self.seed}, "
                f"Size: {self.width}x{self.height}")


def parse_line(line: str) -> dict:
    """sd-scripts' line_to_prompt_dict for the options curate honours; an unknown `--x` is an error
    (sd-scripts skips it silently, and a typo then samples with the defaults)."""
    parts = line.split(" --")
    out = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        m = re.match(r"(ss|[nwhlsd])\s+(.+)$", part.strip(), re.IGNORECASE | re.DOTALL)
        if not m:
            raise CurateError(f"sample prompt {line!r}: unknown option --{part.strip()} "
                              "(known: --n --w --h --l --s --d --ss)")
        out[_OPTIONS[m.group(1).lower()]] = m.group(2).strip()
    return out


def prompts(config) -> list[Prompt]:
    """The config's sample prompts with every setting resolved; a bad value is a CurateError."""
    out = []
    for i, entry in enumerate(config.sample_prompts):
        d = parse_line(entry) if isinstance(entry, str) else dict(entry)
        where = f"sample prompt {i + 1} ({str(d.get('prompt', ''))[:40]!r})"
        try:
            sampler = str(d.get("sample_sampler", config.sample_sampler)).lower()
            sampler = ALIASES.get(sampler, sampler)
            if sampler not in SAMPLER_NAMES:
                raise ValueError(f"sampler {sampler!r} (known: {', '.join(SAMPLER_NAMES)})")
            p = Prompt(prompt=str(d.get("prompt", "")),
                       negative_prompt=str(d.get("negative_prompt", config.sample_negative_prompt)),
                       width=int(d.get("width", config.max_reso[0])) // 8 * 8,
                       height=int(d.get("height", config.max_reso[1])) // 8 * 8,
                       scale=float(d.get("scale", d.get("guidance_scale", config.sample_cfg))),
                       steps=int(d.get("sample_steps", config.sample_steps)),
                       seed=int(d.get("seed", config.seed + i)), sampler=sampler)
        except (TypeError, ValueError) as exc:
            raise CurateError(f"{where}: {exc}") from None
        if min(p.width, p.height) < 64 or not 1 <= p.steps <= 1000 or p.scale < 0:
            raise CurateError(f"{where}: width/height must be >= 64, steps 1-1000, CFG scale >= 0")
        out.append(p)
    return out


def scheduler(name: str, v_prediction: bool):
    """The inference scheduler on the training noise schedule (sd-scripts' get_my_scheduler)."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    from curate.train import sdxl

    base = sdxl.noise_scheduler(v_prediction).config
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(base)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(base)
    return DPMSolverMultistepScheduler.from_config(base, algorithm_type="dpmsolver++", solver_order=2)


def due(config, step: int, epoch_end: int | None = None) -> bool:
    """Is this a sampling point? Step 0 with sample_at_first; with sample_every_n_epochs at the
    end of every n-th epoch (then sample_every_n_steps is ignored, as in sd-scripts)."""
    if not config.sample_prompts:
        return False
    if step == 0:
        return config.sample_at_first
    if config.sample_every_n_epochs:
        return epoch_end is not None and epoch_end % config.sample_every_n_epochs == 0
    return bool(config.sample_every_n_steps) and step % config.sample_every_n_steps == 0


def sample(config, model, step: int, device, precision, board=None) -> list[Path]:
    """One image per prompt with the current weights into output_dir/samples, a contact sheet
    beside them; the training RNG state is put back afterwards."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from PIL.PngImagePlugin import PngInfo

    folder = Path(config.output_dir) / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    rng_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    vae_device = next(model.vae.parameters()).device
    model.vae.to(device)
    was_training = {name: getattr(model, name).training for name in ("unet", "te1", "te2")}
    for name in was_training:
        getattr(model, name).eval()
    pipe = StableDiffusionXLPipeline(
        vae=model.vae, text_encoder=model.te1, text_encoder_2=model.te2, tokenizer=model.tok1,
        tokenizer_2=model.tok2, unet=model.unet, scheduler=scheduler("euler", config.v_parameterization))
    pipe.set_progress_bar_config(disable=True)
    paths, images = [], []
    try:
        with torch.no_grad():
            for i, p in enumerate(prompts(config)):
                pipe.scheduler = scheduler(p.sampler, config.v_parameterization)
                with precision.autocast():
                    image = pipe(p.prompt, negative_prompt=p.negative_prompt, width=p.width, height=p.height,
                                 num_inference_steps=p.steps, guidance_scale=p.scale,
                                 generator=torch.Generator(device).manual_seed(p.seed)).images[0]
                info = PngInfo()
                info.add_text("parameters", p.parameters())
                info.add_text("curate", json.dumps({**asdict(p), "step": step, "model": config.output_name}))
                path = folder / f"step-{step:07d}-{i}.png"
                image.save(path, pnginfo=info)
                paths.append(path)
                images.append(image)
    finally:
        for name, mode in was_training.items():
            getattr(model, name).train(mode)
        model.vae.to(vae_device)
        torch.set_rng_state(rng_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
    sheet = contact_sheet(images)
    sheet.save(folder / f"step-{step:07d}-sheet.png")
    if board is not None:
        board.images(step, images, sheet)
    return paths


def contact_sheet(images, height: int = 256, columns: int = 4):
    """The images side by side, scaled to one height, in rows of `columns`."""
    from PIL import Image

    thumbs = [im.resize((max(1, round(im.width * height / im.height)), height)) for im in images]
    rows = [thumbs[i:i + columns] for i in range(0, len(thumbs), columns)] or [[]]
    width = max([sum(t.width for t in row) for row in rows] + [1])
    sheet = Image.new("RGB", (width, height * len(rows)), "white")
    for r, row in enumerate(rows):
        x = 0
        for t in row:
            sheet.paste(t, (x, r * height))
            x += t.width
    return sheet
