"""Helpers for `make demo`: everything the offline demo needs that a real user brings.

    python -m curate.demo.run prepare DIR        corpus (posts + images), tiny tagger, train config
    python -m curate.demo.run serve CORPUS -- CMD ...   run CMD with a local Danbooru serving CORPUS
    python -m curate.demo.run cg DIR --reg M     a generated "official CG" folder
    python -m curate.demo.run summary DIR        where everything went
    python -m curate.demo.run readme docs/commands.md   regenerate the command reference

The stages themselves run through the Makefile with the commands a user types;
this module only stands in for Danbooru, the game's CG folder and the models.
Images are drawn (flat-colour figures on gradients), small, and deterministic.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

STILL = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
DONE = ".complete"  # written last: a folder without it is regenerated
BACKGROUND_SCALE = 4  # draw_scene's blurred background is drawn at 1/4 size


# --- drawing ------------------------------------------------------------------------


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    im = Image.new("HSV", (1, 1), (int(h * 255) % 256, int(s * 255), int(v * 255)))
    return im.convert("RGB").getpixel((0, 0))


def draw_scene(rng: np.random.Generator, w: int, h: int, figures: int = 1) -> Image.Image:
    """A flat-celluloid-ish picture: gradient sky, soft blobs, one or more chibi figures."""
    hue = rng.random()
    top, bottom = np.array(_hsv(hue, 0.35, 0.95)), np.array(_hsv(hue + 0.08, 0.55, 0.75))
    # the soft background is drawn and blurred at a quarter of the size, then enlarged: the
    # same picture (under one grey level off on average) for a third of the time
    f = BACKGROUND_SCALE
    sw, sh = -(-w // f), -(-h // f)
    t = np.linspace(0, 1, sh)[:, None, None]
    im = Image.fromarray((top * (1 - t) + bottom * t).repeat(sw, 1).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(6):  # background shapes
        r = int(rng.integers(min(w, h) // 12, min(w, h) // 4))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        d.ellipse([(x - r) / f, (y - r) / f, (x + r) / f, (y + r) / f], fill=_hsv(rng.random(), 0.25, 0.98))
    im = im.filter(ImageFilter.GaussianBlur(max(1, min(w, h) // 60) / f)).resize((w, h), Image.Resampling.BICUBIC)
    d = ImageDraw.Draw(im)
    for k in range(figures):
        cx = int(w * (k + 1) / (figures + 1) + rng.normal(0, w * 0.03))
        s = min(w / (figures + 0.5), h) * rng.uniform(0.75, 0.95)
        _figure(d, rng, cx, h, s)
    return im


def _figure(d: ImageDraw.ImageDraw, rng, cx: int, h: int, s: float) -> None:
    hair, eyes, cloth = _hsv(rng.random(), 0.6, 0.8), _hsv(rng.random(), 0.8, 0.6), _hsv(rng.random(), 0.5, 0.9)
    skin, ink = (255, 228, 210), (60, 40, 50)
    head_r = s * 0.2
    hy = h - s * 0.62
    d.rounded_rectangle([cx - s * 0.28, hy + head_r * 0.7, cx + s * 0.28, h + 5], radius=int(s * 0.12),
                        fill=cloth, outline=ink, width=2)                       # body
    d.ellipse([cx - head_r * 1.35, hy - head_r * 1.2, cx + head_r * 1.35, hy + head_r * 1.9], fill=hair)  # hair
    d.ellipse([cx - head_r, hy - head_r, cx + head_r, hy + head_r], fill=skin, outline=ink, width=2)  # face
    d.chord([cx - head_r * 1.05, hy - head_r * 1.15, cx + head_r * 1.05, hy + head_r * 0.3], 180, 360, fill=hair)
    for ex in (-0.4, 0.4):
        x, y = cx + ex * head_r, hy + head_r * 0.15
        d.ellipse([x - head_r * 0.16, y - head_r * 0.24, x + head_r * 0.16, y + head_r * 0.24], fill=eyes, outline=ink)
    d.arc([cx - head_r * 0.25, hy + head_r * 0.35, cx + head_r * 0.25, hy + head_r * 0.6], 20, 160, fill=ink, width=2)


def encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


# --- the corpus: posts with real image files ------------------------------------------


def make_corpus(out: Path, n_posts: int, seed: int = 0) -> dict:
    """posts.jsonl (API-shaped, md5 = the real file's) + files/original/ab/cd/<md5>.<ext>."""
    from curate.demo.synthetic import make_posts

    posts = make_posts(n_posts, seed=seed)
    files = out / "files"
    n_images = 0
    for p in posts:
        scale = 512 / max(p["image_width"], p["image_height"])  # small files, the post's shape
        p["image_width"], p["image_height"] = max(64, round(p["image_width"] * scale)), max(64, round(p["image_height"] * scale))
        fmt = STILL.get(p["file_ext"])
        if fmt is None:  # videos and ugoira: metadata only (the default query leaves them out)
            continue
        rng = np.random.default_rng([seed, p["id"]])
        data = encode(draw_scene(rng, p["image_width"], p["image_height"]), fmt)
        md5 = hashlib.md5(data).hexdigest()
        rel = f"original/{md5[:2]}/{md5[2:4]}/{md5}.{p['file_ext']}"
        (files / rel).parent.mkdir(parents=True, exist_ok=True)
        (files / rel).write_bytes(data)
        p.update(md5=md5, file_size=len(data), file_url=f"https://cdn.donmai.us/{rel}", large_file_url=f"https://cdn.donmai.us/{rel}")
        n_images += 1
    with open(out / "posts.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(p) + "\n" for p in posts)
    return {"posts": len(posts), "images": n_images}


# --- a tiny WD-v3-layout tagger ---------------------------------------------------------

TAGGER_TAGS = ["1girl", "solo", "long_hair", "short_hair", "smile", "blush", "looking_at_viewer", "open_mouth",
               "blue_eyes", "red_eyes", "brown_hair", "black_hair", "blonde_hair", "pink_hair", "white_shirt",
               "school_uniform", "skirt", "halo", "hair_ornament", "upper_body", "simple_background", "sky",
               "cloud", "outdoors", "indoors", "closed_mouth", "bangs", "holding", "jacket", "bow"]
TAGGER_CHARACTERS = ["shiroko_(blue_archive)", "hoshino_(blue_archive)", "aris_(blue_archive)", "yuuka_(blue_archive)"]


def make_tagger(folder: Path, seed: int = 0) -> Path:
    """config.json + model.safetensors + selected_tags.csv, as SmilingWolf's repos have them,
    with a 1-layer ViT: random weights, the real loading and preprocessing path. The weights
    are drawn here with numpy as timm initialises a ViT (linear layers and position embedding
    N(0, 0.02), the patch conv uniform in +-1/sqrt(fan in), layer norms 1 and 0), under
    timm's own state-dict names: making the tagger imports neither torch nor timm (seconds)."""
    from safetensors.numpy import save_file

    rows = [(9, r) for r in ("general", "sensitive", "questionable", "explicit")]
    rows += [(0, t) for t in TAGGER_TAGS] + [(4, c) for c in TAGGER_CHARACTERS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "selected_tags.csv").write_text(
        "tag_id,name,category,count\n" + "".join(f"{100 + i},{n},{c},{1000 - i}\n" for i, (c, n) in enumerate(rows)))
    size, patch, dim, mlp = 64, 16, 32, 128
    args = dict(img_size=size, patch_size=patch, embed_dim=dim, depth=1, num_heads=2, class_token=False,
                global_pool="avg", fc_norm=False, act_layer="gelu_tanh")
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> np.ndarray:  # timm's trunc_normal_(std=0.02): the cut at +-2 never bites
        return rng.normal(0.0, 0.02, shape)

    fan_in = 3 * patch * patch
    state = {"patch_embed.proj.weight": rng.uniform(-1, 1, (dim, 3, patch, patch)) / fan_in ** 0.5,
             "patch_embed.proj.bias": rng.uniform(-1, 1, dim) / fan_in ** 0.5,
             "pos_embed": normal(1, (size // patch) ** 2, dim)}
    for name, (n_out, n_in) in {"attn.qkv": (3 * dim, dim), "attn.proj": (dim, dim),
                                "mlp.fc1": (mlp, dim), "mlp.fc2": (dim, mlp)}.items():
        state[f"blocks.0.{name}.weight"], state[f"blocks.0.{name}.bias"] = normal(n_out, n_in), np.zeros(n_out)
    for norm in ("blocks.0.norm1", "blocks.0.norm2", "norm"):
        state[f"{norm}.weight"], state[f"{norm}.bias"] = np.ones(dim), np.zeros(dim)
    # a head strong enough that tags differ between images
    state["head.weight"] = rng.standard_normal((len(rows), dim)) * 3 / dim ** 0.5
    state["head.bias"] = rng.standard_normal(len(rows)) * 0.5 - 1.0
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}, str(folder / "model.safetensors"))
    config = {"architecture": "vit_base_patch16_224", "num_classes": len(rows), "num_features": dim,
              "global_pool": "avg", "model_args": args,
              "pretrained_cfg": {"custom_load": False, "input_size": [3, size, size], "fixed_input_size": False,
                                 "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
                                 "mean": [0.5] * 3, "std": [0.5] * 3, "num_classes": len(rows)}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


# --- the train config -----------------------------------------------------------------


def _write_config(path: Path, head: str, demo: Path) -> Path:
    """A demo train config: `head` plus the demo's two manifests. Left alone when unchanged,
    so make does not see a newer config and train again."""
    text = head + f"""
[[datasets]]
manifest = "{demo}/manifests/official_cg.parquet"
shuffle_caption = true
caption_tag_dropout_rate = 0.1

[[datasets]]
manifest = "{demo}/manifests/demo_reg.parquet"
is_reg = true
"""
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def write_train_config(path: Path, demo: Path) -> Path:
    """The recipe's shape (configs/baxl_v3.toml) at toy size: tiny-random SDXL, 64-192 px
    buckets, a few AdamW steps (Lion8bit wants a GPU)."""
    text = f"""# The demo's training run: configs/baxl_v3.toml at toy size (written by python -m curate.demo.run).
pretrained = "tiny-random"
output_dir = "{demo}/runs/demo"
output_name = "demo"
resolution = 128
min_bucket_reso = 64
max_bucket_reso = 192
bucket_reso_steps = 32
train_batch_size = 2
gradient_accumulation_steps = 1
learning_rate = 1e-4
lr_scheduler = "constant_with_warmup"
lr_warmup_steps = 2
optimizer_type = "AdamW"
optimizer_args = {{ weight_decay = 0.1, betas = [0.9, 0.95] }}
min_snr_gamma = 5
max_train_steps = 6
save_every_n_steps = 3
max_data_loader_n_workers = 0
seed = 42
"""
    return _write_config(path, text, demo)


def write_lora_config(path: Path, demo: Path) -> Path:
    """The same data as a LoRA beside the fine-tune (network = "lora", docs/lora.md): the
    frozen tiny model, a dim-8 network on the UNet and both text encoders."""
    text = f"""# The demo's LoRA run: the demo's data, a LoRA instead of a full fine-tune (written by python -m curate.demo.run).
pretrained = "tiny-random"
output_dir = "{demo}/runs/demo_lora"
output_name = "demo_lora"
network = "lora"
network_dim = 8
network_alpha = 4
network_lr = 1e-3
text_encoder_lr = 5e-4
resolution = 128
min_bucket_reso = 64
max_bucket_reso = 192
bucket_reso_steps = 32
train_batch_size = 2
lr_scheduler = "constant"
optimizer_type = "AdamW"
min_snr_gamma = 5
max_train_steps = 6
save_every_n_steps = 3
max_data_loader_n_workers = 0
latent_cache_dir = "{demo}/runs/demo/latent_cache"
seed = 42
"""
    return _write_config(path, text, demo)


def prepare(demo: Path, n_posts: int, tagger_too: bool = True) -> None:
    demo.mkdir(parents=True, exist_ok=True)
    (demo / ".started").write_text(str(time.time()))
    corpus = demo / "corpus"
    if not (corpus / DONE).exists():
        shutil.rmtree(corpus, ignore_errors=True)
        corpus.mkdir(parents=True)
        t0 = time.perf_counter()
        n = make_corpus(corpus, n_posts)
        (corpus / DONE).write_text(json.dumps(n))
        print(f"corpus: {n['posts']} posts, {n['images']} images -> {corpus} ({time.perf_counter() - t0:.1f}s)")
    else:
        print(f"corpus: {corpus} (already there)")
    tagger = demo / "tagger"
    if tagger_too and not (tagger / "model.safetensors").exists():  # safetensors: not in the core install
        make_tagger(tagger)
        print(f"tagger: tiny WD-v3-layout ViT -> {tagger}")
    write_train_config(demo / "train.toml", demo)
    write_lora_config(demo / "train_lora.toml", demo)


# --- the "official CG" folder ---------------------------------------------------------


# A user's captions as real folders have them: UTF-8 with a BOM and CRLF, a `.caption`
# file, and prompt escapes (which training text drops).
HAND_CAPTIONS = {
    "cg_02.txt": "\ufeff1girl, solo, classroom, evening sky, looking at viewer\r\n".encode("utf-8"),
    "cg_07.caption": "2girls, rooftop, wind, school uniform".encode("utf-8"),
    "cg_10.txt": "1girl, hoshino \\(blue archive\\), halo, smile".encode("utf-8"),
}


def make_cg(out: Path, reg: Path | None, seed: int = 7) -> dict:
    """Game CGs at 16:9 with what real folders have: video-frame near-duplicates, a
    re-encode, a byte copy, letterboxed and white-bordered versions, a broken file,
    a few images with the user's own captions beside them (HAND_CAPTIONS), and (with
    --reg) a repost of a reg-set image, which dedupe --against catches."""
    done = cg_marker(out)
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    W, H = 768, 432
    counts = {"cg": 0, "near_duplicates": 0, "letterboxed_or_bordered": 0, "broken": 0, "reposts": 0,
              "hand_captioned": 0}
    for i in range(24):
        im = draw_scene(np.random.default_rng([seed, i]), W, H, figures=1 + i % 3)
        im.save(out / f"cg_{i:02d}.png")
        counts["cg"] += 1
        if i % 4 == 0:  # the next video frame: a little brighter, shifted by a few pixels
            frame = Image.eval(im, lambda v: min(255, v + 6)).transform(im.size, Image.Transform.AFFINE, (1, 0, 3, 0, 1, 2))
            frame.save(out / f"cg_{i:02d}_frame2.jpg", quality=88)
            counts["near_duplicates"] += 1
        if i % 5 == 1:  # the same CG, letterboxed into a 4:3 screenshot
            box = Image.new("RGB", (W, W * 3 // 4), (0, 0, 0))
            box.paste(im, (0, (box.height - H) // 2))
            box.save(out / f"screenshot_{i:02d}_letterbox.png")
            counts["letterboxed_or_bordered"] += 1
    for i in range(24, 27):  # black- or white-bordered screenshots with no clean twin: crop trims them
        im = draw_scene(np.random.default_rng([seed, i]), W, H, figures=2)
        box = Image.new("RGB", (W + 96, H + 120), (0, 0, 0) if i % 2 else (255, 255, 255))
        box.paste(im, (48, 60))
        box.save(out / f"screenshot_{i:02d}.png")
        counts["letterboxed_or_bordered"] += 1
    for name, data in HAND_CAPTIONS.items():  # CGs with no near-duplicate: each survives dedupe
        (out / name).write_bytes(data)
        counts["hand_captioned"] += 1
    Image.open(out / "cg_03.png").convert("RGB").save(out / "cg_03_reencoded.jpg", quality=92)
    shutil.copyfile(out / "cg_05.png", out / "cg_05 (copy).png")
    counts["near_duplicates"] += 2
    (out / "cg_broken.png").write_bytes((out / "cg_06.png").read_bytes()[:3000])  # a cut-off download
    counts["broken"] += 1
    repost = _reg_image(reg) if reg else None
    if repost is not None:  # a fan upload of the same art: must not be in both sets
        from curate.common.decode import (
            open_image,  # a downloaded file: through the whitelist and the guard
        )

        open_image(repost).save(out / "fanart_repost.jpg", quality=85)
        counts["reposts"] += 1
    done.write_text(json.dumps(counts))
    return counts


def cg_marker(folder: Path) -> Path:
    """Written when the CG folder is complete; beside it, so ingest never sees it."""
    return folder.parent / f".{folder.name}{DONE}"


def _reg_image(reg: Path) -> Path | None:
    from curate import manifest

    table, _ = manifest.read(reg)
    for row in table.select(["path", "error"]).to_pylist():
        if row["path"] and not row["error"]:
            return reg.parent / row["path"]
    return None


# --- serving the corpus while a command runs -------------------------------------------


def serve(corpus: Path, command: list[str]) -> int:
    """Start the Danbooru look-alike on 127.0.0.1, run `command` with
    CURATE_DANBOORU_URL pointing at it, stop it; the command's exit code."""
    from curate.demo.devserver import DanbooruServer, read_posts

    aliases = {"solo_female": "1girl", "monochrome_(medium)": "monochrome"}
    srv = DanbooruServer(read_posts(corpus / "posts.jsonl"), files=corpus / "files", aliases=aliases).start()
    print(f"local Danbooru: {srv.url} (serving {corpus})", flush=True)
    try:
        return subprocess.call(command, env={**os.environ, "CURATE_DANBOORU_URL": srv.url})
    finally:
        hits = len(srv.log)
        srv.stop()
        print(f"local Danbooru: stopped after {hits} requests", flush=True)


# --- the summary ---------------------------------------------------------------------


def summary(demo: Path) -> list[str]:
    from curate.report.inspect import inspect

    lines = ["", "=" * 72, "curate demo: where everything went", "=" * 72]
    corpus = demo / "corpus"
    if (corpus / DONE).exists():
        n = json.loads((corpus / DONE).read_text())
        lines.append(f"corpus       {corpus}/posts.jsonl: {n['posts']} posts, {n['images']} images (served on 127.0.0.1)")
    cg = demo / "cg"
    if cg_marker(cg).exists():
        n = json.loads(cg_marker(cg).read_text())
        lines.append(f"CG folder    {cg}/: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in n.items()))
    for name in ("demo_reg", "official_cg"):
        m = demo / "manifests" / f"{name}.parquet"
        if m.exists():
            info = inspect(m)
            subsets = ", ".join(f"{k} {v}" for k, v in info["subsets"].items())
            fails = ", ".join(f"{k} {v}" for k, v in info["failures"].items()) or "none"
            lines.append(f"manifest     {m}: {info['rows']} rows ({subsets}), {info['usable']} usable, "
                         f"{info['duplicates']} duplicates, failures: {fails}")
    for label, path in (("images", demo / "manifests" / "images"), ("crops", demo / "manifests" / "official_cg_crops"),
                        ("tagger", demo / "tagger"), ("kohya", demo / "kohya" / "dataset_config.toml"),
                        ("train", demo / "runs" / "demo"), ("lora", demo / "runs" / "demo_lora"),
                        ("report", demo / "report.html")):
        if path.exists():
            extra = ""
            if path.is_dir() and label in ("images", "crops"):
                extra = f" ({sum(1 for f in path.rglob('*') if f.is_file() and f.suffix != '.txt')} files)"
            if label in ("train", "lora"):
                models = sorted(str(p.relative_to(path)) for p in path.glob("*.safetensors"))
                metrics = path / "metrics.jsonl"
                logged = metrics.read_text().splitlines() if metrics.exists() else []
                step = json.loads(logged[-1]).get("step", "?") if logged else 0
                extra = f" (trained to step {step}; model: {', '.join(models) or 'none'}; checkpoints/)"
            lines.append(f"{label:<12} {path}{extra}")
    if (demo / "manifests" / "official_cg.parquet").exists():
        lines.append("review       make demo-review" + ("" if str(demo) == "demo" else f" DEMO={demo}")
                     + "  (a local web app: drop, pick keepers, move crops, edit captions; every stage obeys)")
    if (demo / "manifests" / "official_cg.parquet").exists():
        lines += ["next         in a new shell, put curate on PATH, then ask it about the demo:",
                  f"               . {_venv()}/bin/activate",
                  f"               curate inspect {demo / 'manifests' / 'official_cg.parquet'}"]
    started = demo / ".started"
    if started.exists():
        lines.append(f"took {time.time() - float(started.read_text()):.0f}s; open the report: "
                     f"{(demo / 'report.html').resolve().as_uri()}")
    return lines


def _venv() -> str:
    """The virtual environment this runs in, as the user would type it (relative when below cwd)."""
    prefix = Path(sys.prefix)
    try:
        return str(prefix.relative_to(Path.cwd()))
    except ValueError:
        return str(prefix)


# --- the README's command reference, from the CLI itself ---------------------------------

REFERENCE = Path("docs/commands.md")  # where the reference lives, from the repository root
START, END = "<!-- commands:start (python -m curate.demo readme docs/commands.md) -->", "<!-- commands:end -->"


def command_reference() -> str:
    """Markdown: per command its usage, first help paragraph and the parameters as
    `--help` lists them (Typer's own help records)."""
    import typer
    from typer.main import get_command

    from curate.cli import app

    group = get_command(app)
    out = []
    for name, cmd in group.commands.items():
        ctx = typer.Context(cmd, info_name=f"curate {name}")
        args = [p for p in cmd.params if p.param_type_name == "argument"]
        usage = ["[OPTIONS]"] + [(a.name or "").upper() + ("..." if a.nargs == -1 else "") for a in args]
        doc = (cmd.help or "").strip().split("\n\n")
        out += [f"### curate {name}", "", f"`curate {name} {' '.join(usage)}`", "", " ".join(doc[0].split()), ""]
        rows = []
        for prm in cmd.params:
            record = prm.get_help_record(ctx)
            if record is None or prm.name == "help":
                continue
            label, text = record
            if prm.param_type_name == "argument":
                label = label.split()[0].upper()
            text = " ".join(text.replace("\\[", "[").split()).replace("|", "\\|")
            rows.append(f"| `{label}` | {text} |")
        if rows:
            out += ["| parameter | |", "|---|---|", *rows, ""]
    return "\n".join(out).rstrip() + "\n"


def reference_section(text: str, where: Path) -> tuple[str, str, str]:
    """(head, the generated reference, tail) of a file holding the commands:start/end markers."""
    start = START.split(" (")[0]  # an older marker's command text may differ
    if start not in text or END not in text:
        raise SystemExit(f"{where}: no {START} ... {END} section")
    head, rest = text.split(start, 1)
    marker, rest = rest.split("\n", 1)
    body, tail = rest.split(END, 1)
    return head, body, tail


def write_readme_commands(readme: Path) -> bool:
    text = readme.read_text(encoding="utf-8")
    head, _, tail = reference_section(text, readme)
    new = f"{head}{START}\n{command_reference()}{END}{tail}"
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return new != text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # serve CORPUS -- CMD ...: everything after -- is the command
        if "--" not in argv or len(argv) < 4:
            print("usage: python -m curate.demo.run serve CORPUS -- COMMAND ...", file=sys.stderr)
            return 2
        cut = argv.index("--")
        return serve(Path(argv[1]), argv[cut + 1:])
    ap = argparse.ArgumentParser(prog="python -m curate.demo.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="corpus, tiny tagger, train config")
    p.add_argument("dir", type=Path)
    p.add_argument("--posts", type=int, default=1500)
    p.add_argument("--no-tagger", action="store_true", help="no tiny tagger (the core install has no torch or safetensors)")
    p = sub.add_parser("cg", help="a generated official-CG folder")
    p.add_argument("dir", type=Path)
    p.add_argument("--reg", type=Path, help="plant a repost of this reg manifest's first image")
    p = sub.add_parser("summary", help="where everything went")
    p.add_argument("dir", type=Path)
    p = sub.add_parser("readme", help="regenerate the command reference in a README")
    p.add_argument("readme", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.dir, args.posts, tagger_too=not args.no_tagger)
    elif args.cmd == "cg":
        n = make_cg(args.dir, args.reg)
        print(f"CG folder: {args.dir}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in n.items()))
    elif args.cmd == "readme":
        print(f"{args.readme}: command reference " + ("updated" if write_readme_commands(args.readme) else "already current"))
    else:
        print("\n".join(summary(args.dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
