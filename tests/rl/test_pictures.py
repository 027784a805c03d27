"""Pictures: captions wrapped to their tile (CJK too, never spilling into the next tile), distinct prompts in a
joint run's grids, loss / grad-norm panels and AR / decoder phase bands in the report, integer step ticks."""

import numpy as np
import pytest

from tandem.core.types import PromptRecord
from tandem.rl.run_dir import MIN_TILE, _caption_font, image_grid, phase_spans, style_step_axis, wrap_caption
from tandem.rl.session import distinct_prompts

LONG_EN = "a poster with the words 'HELLO WORLD' in bold letters above a shop door at night"
LONG_ZH = "一张写着「新年快乐」的红色海报贴在商店门口的木门上面"


@pytest.mark.parametrize("text", [LONG_EN, LONG_ZH, "short"])
def test_wrapped_lines_fit_the_tile_and_keep_the_text(text):
    font = _caption_font()
    lines = wrap_caption(text, font, 124, max_lines=20)
    assert all(font.getlength(line) <= 124 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")
    assert len(lines) > 1 or text == "short"
    if text == LONG_EN:  # English breaks between words
        assert all(not line.startswith(" ") and not line.endswith(" ") for line in lines)
        assert set(" ".join(lines).split()) == set(text.split())


def test_overlong_captions_end_with_an_ellipsis():
    font = _caption_font()
    lines = wrap_caption(LONG_ZH * 4, font, 124, max_lines=3)
    assert len(lines) == 3 and lines[-1].endswith("…") and font.getlength(lines[-1]) <= 124


def test_captions_stay_under_their_own_tile():
    tiles = np.zeros((3, 64, 64, 3), np.uint8)
    grid = np.asarray(image_grid(tiles, [LONG_ZH, "", LONG_EN], cols=3))
    w = grid.shape[1] // 3
    assert w >= MIN_TILE  # small tiles are enlarged so a caption has room
    strip = grid[w:]  # below the (square, enlarged) tiles
    inked = (strip < 128).any(axis=2)
    assert inked[:, :w].sum() > 0 and inked[:, 2 * w:].sum() > 0
    assert inked[:, w:2 * w].sum() == 0, "a caption ran into the empty tile next to it"
    assert (inked[:, :w].any(axis=1)).sum() > 2 * 11  # several lines, not one cut line


def test_grids_of_a_joint_run_show_distinct_prompts():
    # a decoder phase of a joint run trains on the AR rollouts: each prompt once per group copy
    records = [PromptRecord(p, {"copy": k}) for p in ("a", "b", "c", "d", "e") for k in range(4)]
    assert [r.prompt for r in distinct_prompts(records, 4)] == ["a", "b", "c", "d"]
    assert [r.prompt for r in distinct_prompts(records[:8], 4)] == ["a", "b"]


ROWS = [{"step": s, "phase": "ar" if (s - 1) // 3 % 2 == 0 else "decoder", "reward/mean": 0.1 * s, "loss": 1.0 / s,
         "grad_norm": 0.5} for s in range(1, 13)]


def test_phase_bands_and_integer_steps():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert phase_spans(ROWS) == [("ar", 1, 3), ("decoder", 4, 6), ("ar", 7, 9), ("decoder", 10, 12)]
    assert phase_spans([dict(r, phase="ar") for r in ROWS]) == []  # one stage: no bands
    fig, ax = plt.subplots()
    ax.plot([r["step"] for r in ROWS[:3]], [0, 1, 2])
    ax.set_xlim(0.5, 3.5)
    style_step_axis(ax, ROWS)
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if 0.5 <= t <= 3.5]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert len(ax.patches) == 4 and {p.get_label() for p in ax.patches} >= {"ar phase", "decoder phase"}
    plt.close(fig)


def test_report_has_loss_and_grad_norm_panels(tmp_path):
    from tandem.rl.config import DataConfig, JobConfig, ModelConfig
    from tandem.rl.report import write_report
    from tandem.rl.run_dir import RunDir

    cfg = JobConfig(output_dir=str(tmp_path), model=ModelConfig(path="/m"), data=DataConfig(prompts="data/demo_prompts.jsonl"))
    run = RunDir(str(tmp_path)).create(cfg)
    for row in ROWS:
        run.log_metrics(row)
    page = write_report(str(tmp_path)).read_text()
    assert 'id="plot-diagnostics" alt="loss, grad_norm"' in page
