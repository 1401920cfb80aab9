"""Where a run's numbers go: metrics.jsonl always (one line per optimizer step, never a step
twice), TensorBoard and/or Weights & Biases as `log_with` says.

W&B is imported only when asked for and respects its own settings (WANDB_MODE=offline writes
under output_dir/wandb for a later `wandb sync`). On --resume, lines and events after the
checkpoint's step (written before an interruption) are dropped, so the curves continue cleanly.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from curate.errors import CurateError


class RunLog:
    def __init__(self, config, out_dir: Path, resume_step: int = 0, log=print):
        self.path = out_dir / "metrics.jsonl"
        _truncate(self.path, resume_step)
        self.metrics = self.path.open("a", encoding="utf-8")
        self.board = self.wandb = None
        where = [f"metrics: {self.path}"]
        if config.log_with in ("tensorboard", "all"):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise CurateError("log_with = \"tensorboard\" needs the tensorboard package "
                                  "(pip install 'curate[ml]'), or set log_with = \"none\"") from None
            folder = out_dir / "tensorboard"
            self.board = SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step else None)
            where.append(f"TensorBoard: tensorboard --logdir {folder}")
        if config.log_with in ("wandb", "all"):
            try:
                import wandb
            except ImportError:
                raise CurateError("log_with = \"wandb\" needs the wandb package (pip install wandb)") from None
            from dataclasses import asdict

            settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items() if k != "datasets"}
            self.wandb = wandb.init(project=config.wandb_project, name=config.output_name, dir=str(out_dir),
                                    config=settings, resume="allow")
            mode = os.environ.get("WANDB_MODE", "online")
            where.append(f"W&B ({mode}): project {config.wandb_project}" +
                         (f", files under {out_dir / 'wandb'}" if mode in ("offline", "dryrun") else ""))
        log("logging to " + "; ".join(where))

    def step(self, step: int, values: dict) -> None:
        """One line per optimizer step (None for a non-finite number) and the same scalars."""
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in values.items()}
        self.metrics.write(json.dumps({"step": step, **clean}) + "\n")
        self.metrics.flush()
        scalars = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and k not in ("epoch",)}
        if self.board:
            for k, v in scalars.items():
                self.board.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(scalars, step=step)

    def images(self, step: int, images: list, sheet) -> None:
        import numpy as np

        if self.board:
            for i, im in enumerate(images):
                self.board.add_image(f"samples/{i}", np.asarray(im.convert("RGB")), step, dataformats="HWC")
            self.board.flush()
        if self.wandb:
            import wandb

            self.wandb.log({"samples": [wandb.Image(im) for im in images]}, step=step)

    def close(self) -> None:
        self.metrics.close()
        if self.board:
            self.board.close()
        if self.wandb:
            self.wandb.finish()


def _truncate(path: Path, keep_until: int) -> None:
    """Drop the lines after `keep_until` (a resumed run writes them again)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= keep_until]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".part")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)
