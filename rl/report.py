"""``tandem report RUN_DIR``: one self-contained HTML page of a run, ``RUN_DIR/report.html``.

Sections, top to bottom: the reward curve (``RunDir.plot_rewards``, also saved as ``reward_curve.png``), the
training diagnostics ``loss``, ``grad_norm``, ``kl``, ``ratio/mean``, ``clipfrac`` (those logged) and every ``eval/*`` metric against
the step (integer steps; a joint run's AR and decoder phases shaded); the latest sample grids of ``samples/`` with their step; a table of the first and last value (and
min / max) of the key metrics; the text-rendering eval of ``eval/text_eval.json`` if ``tandem eval`` wrote one;
the resolved ``config.yaml``. Every image is embedded as a base64 PNG data URI, so the page can be mailed or
archived alone.

A run directory is a folder with a ``config.yaml`` (every tandem command that writes a run writes one);
anything else is a ConfigError and nothing is written.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from pathlib import Path
from typing import Dict, List, Sequence

from tandem.rl.config import ConfigError
from tandem.rl.run_dir import RunDir, style_step_axis

DIAGNOSTICS = ("loss", "grad_norm", "kl", "ratio/mean", "clipfrac")
KEY_METRICS = ("reward/mean", "reward/std", "advantage/zero_std_frac", "ratio/mean", "clipfrac", "approx_kl", "kl", "loss", "grad_norm")
LATEST_GRIDS = 4
GRID_UPSCALE_MAX = 560
MAX_EVAL_ROWS = 50
_STEP_GRID = re.compile(r"step_(\d+)")

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; padding: 16px 20px; max-width: 1160px; color: #1d232a; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 26px 0 8px; border-bottom: 1px solid #dde; }
.meta { color: #556; margin: 0 0 8px; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
.plots img { max-width: 100%; border: 1px solid #dde; }
figure { margin: 0 0 14px; } figcaption { color: #556; font-size: 13px; }
img.grid { max-width: 100%; image-rendering: pixelated; border: 1px solid #dde; }
table { border-collapse: collapse; font-size: 13px; } td, th { padding: 3px 10px; border-bottom: 1px solid #eef; text-align: right; }
td:first-child, th:first-child { text-align: left; } td.text { text-align: left; max-width: 420px; overflow-wrap: anywhere; }
pre { background: #f5f6f8; padding: 10px; font-size: 12px; overflow-x: auto; }
"""


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _img(data: bytes, element_id: str, css_class: str = "", alt: str = "", width: int = 0) -> str:
    cls = f' class="{css_class}"' if css_class else ""
    size = f' width="{width}"' if width else ""
    return f'<img id="{element_id}"{cls}{size} alt="{html.escape(alt)}" src="{_png_uri(data)}">'


def _grid_img(data: bytes, element_id: str, alt: str) -> str:
    """A sample grid, shown twice its size when it is at most GRID_UPSCALE_MAX px wide (tiny demo tiles)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        width = im.width
    return _img(data, element_id, "grid", alt, width * 2 if width <= GRID_UPSCALE_MAX else width)


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _series(rows: Sequence[Dict], key: str):
    """(steps, values) of the rows where ``key`` has a number."""
    pairs = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _panels(rows: Sequence[Dict], keys: Sequence[str]) -> bytes:
    """One small line plot per metric key (value against optimizer step), three per row, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    nrows = -(-len(keys) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.7 * cols, 2.4 * nrows), dpi=100, squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        steps, values = _series(rows, key)
        ax.plot(steps, values, marker="o" if len(steps) <= 20 else None, ms=3, lw=1.5)
        ax.set_title(key, fontsize=10)
        style_step_axis(ax, rows)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    fig.supxlabel("optimizer step", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _plots(run: RunDir, rows: List[Dict]) -> str:
    if not rows:
        return "<p>No metrics logged yet (metrics.jsonl is missing or empty).</p>"
    parts = [_img(run.plot_rewards().read_bytes(), "plot-rewards", alt="reward curve")]
    diagnostics = [k for k in DIAGNOSTICS if _series(rows, k)[0]]
    if diagnostics:
        parts.append(_img(_panels(rows, diagnostics), "plot-diagnostics", alt=", ".join(diagnostics)))
    evals = sorted({k for r in rows for k in r if k.startswith("eval/") and isinstance(r[k], (int, float))})
    if evals:
        parts.append(_img(_panels(rows, evals), "plot-eval", alt="eval metrics"))
    return '<div class="plots">' + "".join(parts) + "</div>"


def _latest_grids(run: RunDir) -> List[Path]:
    """Up to LATEST_GRIDS PNGs of samples/, newest step first (``step_N.png``; other names after them)."""
    def order(path: Path):
        m = _STEP_GRID.fullmatch(path.stem)
        return (int(m.group(1)) if m else -1, path.stat().st_mtime)

    return sorted(run.samples.glob("*.png"), key=order, reverse=True)[:LATEST_GRIDS]


def _grids(run: RunDir) -> str:
    grids = _latest_grids(run)
    if not grids:
        return "<p>No sample grids in samples/ yet.</p>"
    parts = []
    for i, path in enumerate(grids):
        m = _STEP_GRID.fullmatch(path.stem)
        label = f"step {int(m.group(1))}" if m else path.stem
        parts.append(f"<figure>{_grid_img(path.read_bytes(), f'grid-{i}', label)}"
                     f"<figcaption>{html.escape(label)} — samples/{html.escape(path.name)}</figcaption></figure>")
    return "".join(parts)


def _summary(rows: List[Dict]) -> str:
    """First / last value (with their steps), min and max of the key metrics that were logged."""
    present = {k for r in rows for k in r}
    per_reward = sorted(k for k in present if k.startswith("reward/") and k.endswith("/mean") and k != "reward/mean")
    keys = [k for k in KEY_METRICS if k in present] + per_reward
    keys += sorted(k for k in present if k.startswith(("time/", "eval/")))
    lines = []
    for key in keys:
        steps, values = _series(rows, key)
        if values:
            lines.append(f"<tr><td>{html.escape(key)}</td><td>{_fmt(values[0])}</td><td>{_fmt(steps[0])}</td><td>{_fmt(values[-1])}</td>"
                         f"<td>{_fmt(steps[-1])}</td><td>{_fmt(min(values))}</td><td>{_fmt(max(values))}</td></tr>")
    if not lines:
        return "<p>No metrics logged yet.</p>"
    head = "<tr><th>metric</th><th>first</th><th>at step</th><th>last</th><th>at step</th><th>min</th><th>max</th></tr>"
    return f'<table id="metrics">{head}{"".join(lines)}</table>'


def _eval(run: RunDir) -> str:
    folder = run.path / "eval"
    summary_file = folder / "text_eval.json"
    if not summary_file.is_file():
        return "<p>No text-rendering eval yet (run <code>tandem eval --config ...</code> with this output_dir).</p>"
    try:
        result = json.loads(summary_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{summary_file}: not valid JSON ({e.msg}); rerun `tandem eval` or remove it") from None
    meta = result.get("meta", {})
    named = list(result["per_language"].items()) + [("all", result["overall"])]
    table = "<tr><th>language</th><th>n</th><th>words</th><th>word accuracy</th><th>1 − NED</th><th>NED</th></tr>" + "".join(
        f"<tr><td>{_fmt(name)}</td><td>{_fmt(s['n'])}</td><td>{_fmt(s['words'])}</td><td>{_fmt(s['word_accuracy'])}</td>"
        f"<td>{_fmt(s['one_minus_ned'])}</td><td>{_fmt(s['ned'])}</td></tr>" for name, s in named)
    parts = [f'<table id="eval">{table}</table>']
    if meta:  # written by `tandem eval` (the trainer's periodic eval has none)
        parts.insert(0, f'<p class="meta">checkpoint: {_fmt(meta["checkpoint"] or "base model")}; prompts: {_fmt(meta["prompts"])}; '
                        f'{_fmt(meta["height"])}×{_fmt(meta["width"])} px, {_fmt(meta["num_steps"])} steps, seed {_fmt(meta["seed"])}</p>')
    samples_file = folder / "text_eval_samples.jsonl"
    if samples_file.is_file():
        samples = [json.loads(line) for line in samples_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        body = "".join(f'<tr><td class="text">{html.escape(s["target"])}</td><td class="text">{html.escape(s["ocr"])}</td>'
                       f"<td>{_fmt(s['word_accuracy'])}</td><td>{_fmt(s['ned'])}</td></tr>" for s in samples[:MAX_EVAL_ROWS])
        parts.append(f"<h3>Samples (first {min(len(samples), MAX_EVAL_ROWS)} of {len(samples)})</h3><table>"
                     f"<tr><th>target</th><th>OCR read</th><th>word accuracy</th><th>NED</th></tr>{body}</table>")
    grid = folder / "text_eval.png"
    if grid.is_file():
        parts.append(f"<figure>{_grid_img(grid.read_bytes(), 'eval-grid', 'eval images')}<figcaption>eval images</figcaption></figure>")
    return "".join(parts)


def _header(run: RunDir, rows: List[Dict]) -> str:
    steps = [r["step"] for r in rows if "step" in r]
    times = {k: sum(_series(rows, k)[1]) for k in sorted({k for r in rows for k in r if k.startswith("time/")})}
    facts = [f"{len(rows)} logged steps, last step {steps[-1]}" if steps else "no logged steps"]
    facts += [f"{k} total {v:.1f}" for k, v in times.items()]
    return f"<h1>tandem run: {html.escape(run.path.name)}</h1><p class=\"meta\">{html.escape(str(run.path.resolve()))} — {html.escape('; '.join(facts))}</p>"


def write_report(run_dir: str) -> Path:
    """Write ``run_dir/report.html`` (atomically) and return its path. Not a run directory -> ConfigError."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise ConfigError(f"run directory not found: {run_dir} (pass the output_dir of a tandem run)")
    config_file = run.path / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{run_dir} is not a tandem run directory: it has no config.yaml (pass the output_dir of a tandem run)")
    rows = run.read_metrics()
    sections = [
        _header(run, rows),
        "<h2>Curves</h2>", _plots(run, rows),
        "<h2>Latest sample grids</h2>", _grids(run),
        "<h2>Metrics</h2>", _summary(rows),
        "<h2>Text-rendering eval</h2>", _eval(run),
        "<h2>Config</h2>", f"<pre id=\"config\">{html.escape(config_file.read_text(encoding='utf-8'))}</pre>",
    ]
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>tandem run {html.escape(run.path.name)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n")
    out = run.path / "report.html"
    tmp = run.path / "report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
