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
CAPTION_SIZE = 11
CAPTION_LINES = 4  # at most; the last shown line ends with an ellipsis when the caption is longer
MIN_TILE = 128  # tiles narrower than this are enlarged (nearest neighbour) so that captions have room
PHASE_COLORS = {"ar": "#4c72b0", "decoder": "#dd8452"}


def _caption_font():
    from PIL import ImageFont

    for path in CAPTION_FONTS:  # a CJK-capable font when installed (make installs it), else PIL's default
        if os.path.isfile(path):
            return ImageFont.truetype(path, CAPTION_SIZE)
    return ImageFont.load_default(size=CAPTION_SIZE)


def wrap_caption(text: str, font, width: int, max_lines: int = CAPTION_LINES) -> List[str]:
    """Greedy wrap of ``text`` into lines at most ``width`` px wide in ``font``: a line breaks at its last space
    when a word would overflow, else between any two characters (CJK text has no spaces); past ``max_lines``
    the last line ends with an ellipsis."""
    lines, line = [], ""
    for ch in " ".join(text.split()):
        if not line or font.getlength(line + ch) <= width:
            line += ch
            continue
        cut = line.rfind(" ")
        if ch != " " and cut > 0:  # carry the partial word to the next line
            lines.append(line[:cut])
            line = line[cut + 1:] + ch
        else:
            lines.append(line.rstrip())
            line = "" if ch == " " else ch
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "…"]
    return lines


def image_grid(images: np.ndarray, captions: Optional[Sequence[str]] = None, cols: Optional[int] = None):
    """(N, H, W, 3) uint8 -> one PIL image, ``cols`` per row, each tile with its caption wrapped under it.

    Tiles narrower than MIN_TILE px are enlarged by an integer factor (nearest neighbour); each caption is
    wrapped to its tile's width (``wrap_caption``), so it never runs into the next tile.
    """
    from PIL import Image, ImageDraw

    n, h, w, _ = images.shape
    k = max(1, -(-MIN_TILE // w)) if captions else 1
    h, w = h * k, w * k
    cols = cols or min(n, 8)
    rows = math.ceil(n / cols)
    font = _caption_font()
    wrapped = [wrap_caption(c, font, w - 4) for c in captions] if captions else []
    line_h = CAPTION_SIZE + 3
    cap_h = (max(map(len, wrapped), default=0) * line_h + 4) if captions else 0
    grid = Image.new("RGB", (cols * w, rows * (h + cap_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + cap_h)
        grid.paste(Image.fromarray(im).resize((w, h), Image.NEAREST), (x, y))
        for j, line in enumerate(wrapped[i] if captions else []):
            draw.text((x + 2, y + h + 2 + j * line_h), line, fill="black", font=font)
    return grid


def phase_spans(rows: Sequence[Dict]) -> List[tuple]:
    """[(phase, first step, last step)] of consecutive rows with the same ``phase``; [] for a one-phase run."""
    spans: List[list] = []
    for r in rows:
        phase = r.get("phase")
        if spans and spans[-1][0] == phase:
            spans[-1][2] = r["step"]
        else:
            spans.append([phase, r["step"], r["step"]])
    return [tuple(s) for s in spans] if len({s[0] for s in spans}) > 1 else []


def style_step_axis(ax, rows: Sequence[Dict]) -> None:
    """Integer optimizer steps on the x axis, and a shaded band per AR / decoder phase of a joint run."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    labelled = set()
    for phase, first, last in phase_spans(rows):
        ax.axvspan(first - 0.5, last + 0.5, color=PHASE_COLORS.get(phase, "#999999"), alpha=0.12, lw=0,
                   label=None if phase in labelled else f"{phase} phase")
        labelled.add(phase)


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
        style_step_axis(ax, rows)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("reward")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = self.path / "reward_curve.png"
        fig.savefig(out)
        plt.close(fig)
        return out


def scalars(metrics: Dict) -> Dict:
    """``metrics`` with numpy / torch scalars as Python numbers (NaN kept: JSON for state.json, not a metrics line)."""
    return {k: v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v for k, v in metrics.items()}


def _plain(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
