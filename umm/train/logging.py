"""Run logs, rank 0 only: a tqdm bar, ``metrics.jsonl``, TensorBoard, optional wandb, a loss curve.

``metrics.jsonl`` is opened in append mode and, on resume, rows past the resumed step are dropped
first, so the file always reads as one run without repeated steps.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional

from umm.config.schema import LoggerConfig
from umm.errors import UmmError


class LoggerSetupError(UmmError, RuntimeError):
    pass


def read_metrics(path) -> List[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill mid-write
                    continue
    return rows


class RunLogger:
    def __init__(self, cfg: LoggerConfig, run_dir: Path, *, enabled: bool, start_step: int, total_steps: int,
                 run_name: str, config: Optional[dict] = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._tb = self._wandb = self._bar = self._file = None
        if not enabled:
            return
        if cfg.wandb:
            try:
                import wandb
            except ImportError as e:
                raise LoggerSetupError(
                    "logger.wandb=true but the wandb package is not installed: "
                    "pip install wandb, or set logger.wandb=false"
                ) from e
        self._truncate_after(start_step)
        self._file = open(self.metrics_path, "a")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1)
        if cfg.wandb:
            self._wandb = wandb.init(project=cfg.wandb_project, name=run_name, id=run_name, resume="allow",
                                     dir=str(self.run_dir), config=config)
        if cfg.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=run_name, dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        self._rewrite([r for r in read_metrics(self.metrics_path) if r.get("step", 0) <= step])

    def _rewrite(self, rows: List[dict]) -> None:
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.metrics_path)

    def advance(self, n: int = 1, **postfix) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()
                                       if v is not None}, refresh=False)  # None: not known yet

    def log(self, row: Dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        step = row["step"]
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                if self._tb is not None:
                    self._tb.add_scalar(f"train/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def amend(self, step: int, values: Dict) -> None:
        """Add ``values`` to the row of ``step`` already written (numbers known only later, such as a
        checkpoint's cost once it is complete); the file is rewritten whole and replaced atomically."""
        if not self.enabled:
            return
        self._file.close()
        rows = read_metrics(self.metrics_path)
        for r in rows:
            if r.get("step") == step:
                r.update(values)
        self._rewrite(rows)
        self._file = open(self.metrics_path, "a")
        for k, v in values.items():
            if self._tb is not None and isinstance(v, (int, float)):
                self._tb.add_scalar(f"train/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log(values)  # at wandb's current step: it drops values logged for an earlier one

    def image(self, tag: str, image, step: int) -> None:
        """A PIL image to TensorBoard and wandb (when on)."""
        if not self.enabled:
            return
        if self._tb is not None:
            import numpy as np

            self._tb.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(image)}, step=step)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._file is not None:
            self._file.close()
        self._bar = self._tb = self._wandb = self._file = None


def plot_loss_curve(metrics_path, out_png) -> Optional[Path]:
    rows = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in rows]
    for key in ("loss", "ce", "mse"):
        if any(key in r for r in rows):
            ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
