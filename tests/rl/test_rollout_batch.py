"""grpo.rollout_batch_size: how many samples one rollout call takes, apart from the training minibatch.

What is sampled must not depend on it (per-copy seeds): a job with calls of 8 samples writes the metrics of the same
job with calls of 4, within float rounding of the different batch shapes.
"""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tests.cli_run import assert_user_mistake, tandem_cli
from tandem.rl.config import load_config
from tandem.rl.rollout_batch import RolloutBatching
from tandem.rl.session import train

VOLATILE = ("time/", "cost/", "rollout/call_samples")  # timings, and the call size itself


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(a, b, tol=1e-5):
    assert len(a) == len(b) > 0
    for ra, rb in zip(a, b):
        keys = {k for k in ra if not k.startswith(VOLATILE)}
        assert keys == {k for k in rb if not k.startswith(VOLATILE)}
        for k in keys:
            va, vb = ra[k], rb[k]
            if isinstance(va, float) and isinstance(vb, float) and math.isfinite(va):
                assert abs(va - vb) <= tol * max(1.0, abs(va)), (ra["step"], k, va, vb)
            else:
                assert va == vb, (ra["step"], k, va, vb)


def job(stage, tiny, out, prompts, *extra):
    return load_config(f"configs/demo/{stage}.yaml", [
        f"output_dir={out}", f"model.path={tiny}", f"data.prompts={prompts}", "logging.progress=false",
        "reward_host.backend=local", "logging.sample_every=0", "logging.checkpoint_every=0", "max_steps=4",
        "grpo.num_generations=4", "grpo.prompts_per_step=2", "grpo.mini_batch_size=4", "grpo.old_log_probs=recompute",
        *extra], stage=stage)


@pytest.fixture(scope="module")
def reference_prompts(tmp_path_factory):
    """Prompts without quoted text (the glyph states of a call are padded to its longest) and each a reference
    image, so the decoder's conditions (``condition_source: reference``) draw nothing per call."""
    folder = tmp_path_factory.mktemp("refs")
    lines = []
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]):
        Image.fromarray(np.full((64, 64, 3), colour, np.uint8)).save(folder / f"ref{i}.png")
        lines.append(json.dumps({"prompt": f"a plain square number {i}", "reference": f"ref{i}.png"}))
    (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "prompts.jsonl"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ar", "decoder"])
def test_samples_do_not_depend_on_the_rollout_batch(stage, tiny_model_path, tmp_path, reference_prompts):
    extra = ["decoder.condition_source=reference"] if stage == "decoder" else []
    runs = [train(job(stage, tiny_model_path, tmp_path / str(n), reference_prompts, f"grpo.rollout_batch_size={n}",
                      *extra), stage) for n in (4, 8)]
    assert_same_metrics(rows(runs[0]), rows(runs[1]))



@pytest.mark.slow
def test_ar_job_draws_a_batch_in_one_sampler_call_where_it_recomputes(tiny_model_path, tmp_path, reference_prompts,
                                                                     monkeypatch):
    """With the old log-probs recomputed, the AR policy draws each rollout batch's tokens in one sampler call
    (``Policy.prefetch``) and its calls of 4 only render; keeping the sampler's log-probs, each call draws its own.
    The samples, and so every reward and advantage, are the same either way."""
    from tandem.policies.ar import GlmImageARPolicy

    rows_per_call = []
    real = GlmImageARPolicy._draw  # the sampler call of a rollout or a prefetch

    def counted(self, prompts_rep, meta_rep, group_ids, group_size, seeds):
        rows_per_call.append(len(prompts_rep))
        return real(self, prompts_rep, meta_rep, group_ids, group_size, seeds)

    monkeypatch.setattr(GlmImageARPolicy, "_draw", counted)
    runs = {}
    for mode in ("recompute", "sampler"):
        rows_per_call.clear()
        runs[mode] = rows(train(job("ar", tiny_model_path, tmp_path / mode, reference_prompts,
                                    "grpo.rollout_batch_size=4", f"grpo.old_log_probs={mode}"), "ar"))
        assert rows_per_call == ([8, 8] if mode == "recompute" else [4, 4, 4, 4]), mode
    sample_keys = [k for k in runs["sampler"][0] if k.startswith(("reward/", "advantage/"))]
    assert sample_keys
    for a, b in zip(runs["recompute"], runs["sampler"]):
        for k in sample_keys:
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (a["step"], k)

def test_cpu_auto_keeps_minibatch_calls_and_the_training_layout():
    cpu = torch.device("cpu")
    whole_groups = RolloutBatching(0, copies=4, minibatch=8, device=cpu)
    assert [whole_groups.next_call(16), whole_groups.forward_chunk] == [8, 8]
    assert whole_groups.forwards_minibatches
    split_groups = RolloutBatching(0, copies=8, minibatch=4, device=cpu)  # a minibatch splits a group: one call
    assert [split_groups.next_call(16), split_groups.forward_chunk] == [16, 4]
    fixed = RolloutBatching(16, copies=4, minibatch=8, device=cpu)
    assert [fixed.next_call(32), fixed.next_call(8), fixed.forward_chunk] == [16, 8, None]
    assert not fixed.forwards_minibatches


@pytest.mark.parametrize("value", ["6", "12", "64"])
def test_rollout_batch_size_must_be_whole_groups_and_minibatches(value, tmp_path):
    # groups of 4, minibatches of 8 (calls: multiples of 8), 16 samples per rollout batch
    r = tandem_cli("train", "decoder", "--config", "configs/demo/decoder.yaml", "--dry-run", f"output_dir={tmp_path}",
                   "grpo.num_generations=4", "grpo.prompts_per_step=4", "grpo.mini_batch_size=8",
                   f"grpo.rollout_batch_size={value}")
    assert_user_mistake(r, "grpo.rollout_batch_size")
