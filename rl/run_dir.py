"""The run directory: ``config.yaml``, ``metrics.jsonl``, ``samples/``, ``checkpoints/``, ``reward_curve.png``."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from tandem.core.errors import ConfigError
from tandem.rl.config import JobConfig, to_yaml


CAPTION_FONTS = ("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


def _caption_font():
    from PIL import ImageFont

    for path in CAPTION_FONTS:  # a CJK-capable font when installed (make installs it), else PIL's default
        if os.path.isfile(path):
            return ImageFont.truetype(path, 10)
    return ImageFont.load_default()


def image_grid(images: np.ndarray, captions: Optional[Sequence[str]] = None, cols: Optional[int] = None):
    """(N, H, W, 3) uint8 -> one PIL image, ``cols`` per row, with a caption strip under each tile."""
    from PIL import Image, ImageDraw

    n, h, w, _ = images.shape
    cols = cols or min(n, 8)
    rows = math.ceil(n / cols)
    cap_h = 14 if captions else 0
    grid = Image.new("RGB", (cols * w, rows * (h + cap_h)), "white")
    draw, font = ImageDraw.Draw(grid), _caption_font()
    for i, im in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + cap_h)
        grid.paste(Image.fromarray(im), (x, y))
        if captions:
            draw.text((x + 2, y + h + 1), captions[i][: max(4, w // 6)], fill="black", font=font)
    return grid


class RunDir:
    """Writer of one run directory. Nothing is created until ``create()`` (after the config validated)."""

    def __init__(self, output_dir: str):
        self.path = Path(output_dir)
        self.samples = self.path / "samples"
        self.checkpoints = self.path / "checkpoints"
        self.metrics_file = self.path / "metrics.jsonl"

    def create(self, config: JobConfig) -> "RunDir":
        self.samples.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        tmp = self.path / "config.yaml.tmp"
        tmp.write_text(to_yaml(config))
        os.replace(tmp, self.path / "config.yaml")
        return self

    def log_metrics(self, metrics: Dict[str, float]) -> None:
        with self.metrics_file.open("a") as f:
            f.write(json.dumps({k: _plain(v) for k, v in metrics.items()}) + "\n")

    def check_writable(self) -> None:
        """ConfigError (one line) when ``output_dir`` is a file or cannot be written; creates nothing."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"output_dir {self.path} is a file, not a folder; choose another output_dir")
        existing = self.path
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"output_dir {self.path}: {existing} is a file, not a folder; choose another output_dir")
        try:  # os.access says yes to root even on read-only mounts: try it
            fd, probe = tempfile.mkstemp(prefix=".tandem-probe-", dir=existing)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise ConfigError(f"output_dir {self.path} is not writable ({e.strerror} in {existing}); choose another "
                              f"output_dir") from None

    def read_metrics(self) -> List[Dict[str, float]]:
        """The rows of metrics.jsonl. A last line cut short (a killed run's partial write) is dropped; any other
        line that is not a JSON object with an integer ``step`` is a ConfigError naming it."""
        if not self.metrics_file.is_file():
            return []
        text = self.metrics_file.read_text(encoding="utf-8", errors="replace")
        lines = text.split("\n")
        rows = []
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if n == len(lines):  # no newline after it: the write was cut off
                    break
                raise ConfigError(f"{self.metrics_file}:{n}: not a JSON line ({e.msg}); fix or remove that line") from None
            if not (isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool)):
                raise ConfigError(f"{self.metrics_file}:{n}: a metrics line must be a JSON object with an integer "
                                  f"'step'; fix or remove that line")
            rows.append(row)
        return rows

    def truncate_metrics(self, step: int) -> None:
        """Drop lines past ``step`` (logged by a run killed after its last checkpoint; resume redoes them)."""
        if not self.metrics_file.is_file():  # resumed from another run's checkpoint into a new output_dir
            return
        kept = [r for r in self.read_metrics() if r["step"] <= step]
        tmp = self.metrics_file.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.metrics_file)

    def save_grid(self, name: str, images: np.ndarray, captions: Optional[Sequence[str]] = None) -> Path:
        out = self.samples / f"{name}.png"
        image_grid(images, captions).save(out)
        return out

    def plot_rewards(self) -> Optional[Path]:
        """reward_curve.png: reward/mean (with +-std band) and each reward/<name>/mean against step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.read_metrics()
        if not rows:
            return None
        steps = np.array([r["step"] for r in rows])
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        mean = np.array([r.get("reward/mean", np.nan) for r in rows], dtype=float)
        std = np.array([r.get("reward/std", np.nan) for r in rows], dtype=float)
        ax.plot(steps, mean, label="reward/mean", lw=2)
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        for key in sorted({k for r in rows for k in r if k.startswith("reward/") and k.endswith("/mean")} - {"reward/mean"}):
            ax.plot(steps, [r.get(key, np.nan) for r in rows], label=key, lw=1)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("reward")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = self.path / "reward_curve.png"
        fig.savefig(out)
        plt.close(fig)
        return out


def _plain(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
