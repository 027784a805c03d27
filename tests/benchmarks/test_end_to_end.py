"""``benchmarks.end_to_end``: its ``--tiny`` smoke run (tests/benchmarks/smoke.py) — a whole ``tandem train
decoder`` job of the glm_image config in a subprocess, reward actors on the Ray cluster that job starts, over the
tiny release-layout pipeline (``tiny_release_work``) — a rerun in the same ``--work``, a child that fails, and the
parts that read a run without a GPU: each rollout batch's split and standing (complete, warm-up, steady) from a
metrics.jsonl, the DiT FLOPs, the reward overrides."""

import json
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from benchmarks import end_to_end as e2e
from tests.benchmarks.smoke import run_tiny

TINY_FLAGS = ["--device", "cpu", "--stages", "decoder", "--prompts", "1", "--generations", "2", "--minibatch", "2"]


def test_tiny_run_writes_its_results(tmp_path, tiny_release_work, one_thread, capsys):
    """The job runs in ``--work`` (where the tiny pipeline already is) and ends with exit 0 after its one step; one
    rollout batch is no steady batch: the row says so and a hint names the --steps that give some."""
    flags = [*TINY_FLAGS, "--steps", "1", "--work", str(tiny_release_work)]
    (row,) = run_tiny("end_to_end", tmp_path, flags, fills=["rows"])["rows"]
    assert row["stage"] == "decoder" and row["rc"] == 0 and row["optimizer_steps"] == 1
    assert row["steady_n"] == 0 and row["s_per_rl_step"] is None and row["note"] == "no steady batch"
    assert "hint: decoder launch 1 has no steady rollout batch" in capsys.readouterr().out
    assert row["steps_for_steady"] == 3  # 1 optimizer step per rollout batch of 2 samples, minibatch 2
    assert row["startup_s"] > 0  # loading and the reward actors, before the run clock


@pytest.mark.slow
def test_a_rerun_in_the_same_work_gives_its_own_rows(tmp_path, tiny_release_work, one_thread):
    """The second run's job starts in a fresh run folder (exit 0) and its row is read from its own metrics.jsonl."""
    flags = [*TINY_FLAGS, "--model", str(tiny_release_work / "tiny-pipe"), "--extras",
             str(tiny_release_work / "tiny-extras"), "--work", str(tmp_path / "work")]
    (first,) = run_tiny("end_to_end", tmp_path / "1", [*flags, "--steps", "1"], fills=["rows"])["rows"]
    (second,) = run_tiny("end_to_end", tmp_path / "2", [*flags, "--steps", "2"], fills=["rows"])["rows"]
    assert first["rc"] == 0 and first["optimizer_steps"] == 1
    assert second["rc"] == 0 and second["optimizer_steps"] == 2 and second["rollouts"] == 2
    metrics = tmp_path / "work" / "decoder-1gpu-torchrun-ddp-2-1" / "metrics.jsonl"
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
    # the CPU's rollout call is one minibatch in every batch: the second batch is steady
    assert [b["call_samples"] for b in second["batches"]] == [2, 2] and second["steady_n"] == 1
    assert second["s_per_rl_step"] == pytest.approx(second["batches"][1]["wall_s"])


def test_a_failed_child_shows_its_exit_code_and_no_figures(tmp_path, tiny_release_work, one_thread):
    """A job refused at its prompt file (exit 2, a file the config accepts but the job cannot read) beside an old
    run folder: the row holds rc 2 and nothing read from the old folder's metrics, which is gone."""
    work = tmp_path / "work"
    stale = work / "decoder-1gpu-torchrun-ddp-2-1"
    stale.mkdir(parents=True)
    write_metrics(stale / "metrics.jsonl", [step(0, 10.0, train=1.0), step(1, 20.0, train=1.0)])
    (tmp_path / "prompts.jsonl").write_text("not a JSON line\n")
    flags = [*TINY_FLAGS, "--steps", "1", "--model", str(tiny_release_work / "tiny-pipe"), "--extras",
             str(tiny_release_work / "tiny-extras"), "--work", str(work), "--set", f"data.prompts={tmp_path}/prompts.jsonl"]
    (row,) = run_tiny("end_to_end", tmp_path, flags, fills=["rows"])["rows"]
    assert row["rc"] == 2 and row["batches"] == []
    assert row.get("s_per_rl_step") is None and row.get("first_rl_step_s") is None
    assert row["note"] == "child exited 2: no figures"
    assert not (stale / "metrics.jsonl").exists()


def test_a_failed_child_is_not_read_even_where_a_metrics_file_is(tmp_path):
    """Exit 1 after some steps (a runtime failure): its metrics are not shown as a launch's figures."""
    write_metrics(tmp_path / "metrics.jsonl", [step(0, 10.0, train=1.0), step(1, 20.0, train=1.0)])
    figures = e2e.launch_figures(None, "decoder", 1, tmp_path, tmp_path / "child.json", [])
    assert figures == {"note": "child exited 1: no figures", "batches": [], "steady_n": 0}


# ------------------------------------------------------------------------------------------------ reading a run
def step(rollout, elapsed, phase="decoder", call=None, rollout_s=0.0, reward_s=0.0, recompute_s=0.0, train=0.0):
    """One metrics.jsonl row as the trainer writes it (the keys the benchmark reads)."""
    row = {"rollout": rollout, "phase": phase, "time/rollout_s": rollout_s, "time/reward_s": reward_s,
           "time/train_s": train, "cost/elapsed_s": elapsed}
    if recompute_s:
        row["time/recompute_s"] = recompute_s
    if call is not None:
        row["rollout/call_samples"] = call
    return row


def write_metrics(path, rows):
    """``rows`` as a metrics.jsonl, numbered as optimizer steps 1, 2, ..."""
    path.write_text("".join(json.dumps({"step": i + 1, **r}) + "\n" for i, r in enumerate(rows)))
    return path


def test_each_rollout_batch_is_split(tmp_path):
    metrics = write_metrics(tmp_path / "metrics.jsonl", [
        step(0, 80.0, "ar", rollout_s=60.0, reward_s=1.0, train=3.0), step(0, 82.0, "ar", train=2.0),
        step(1, 127.0, "ar", rollout_s=40.0, reward_s=0.5, recompute_s=2.0, train=3.0), step(1, 128.5, "ar", train=1.5),
    ])
    per_rollout = [{"decode_s": 20.0, "token_s": 35.0}, {"decode_s": 10.0, "token_s": 25.0}]
    batches = e2e.rollout_batches(metrics, e2e.BatchPlan("ar", per_batch=2), per_rollout)
    row = e2e.summarise(batches, samples=8, gpus=1, flops={"render": 4.65e15, "train": 1e15})
    first, second = row["batches"]
    assert first["wall_s"] == 82.0 and first["other_s"] == pytest.approx(82 - 60 - 1 - 5)
    assert second["wall_s"] == pytest.approx(46.5) and second["decode_s"] == 10.0 and second["token_s"] == 25.0
    assert row["s_per_rl_step"] == pytest.approx(46.5) and row["steady_n"] == 1  # the batches after the first
    assert row["first_rl_step_s"] == 82.0 and row["warmup_s"] == 82.0
    assert row["gpu_s_per_sample"] == pytest.approx(46.5 / 8)
    assert row["train_frac"] == pytest.approx(4.5 / 46.5) and row["decode_frac"] == pytest.approx(10 / 46.5)
    assert row["token_frac"] == pytest.approx(25 / 46.5) and row["recompute_frac"] == pytest.approx(2 / 46.5)
    assert second["other_s"] == pytest.approx(46.5 - 40 - 0.5 - 2 - 4.5)
    assert row["mfu_render"] == pytest.approx(4.65e15 / 10.0 / e2e.C.PEAK_BF16_FLOPS)
    assert row["mfu_train"] == pytest.approx(1e15 / 4.5 / e2e.C.PEAK_BF16_FLOPS) and row["mfu_rollout"] is None
    assert row["optimizer_steps"] == 4 and e2e.first_step(metrics)["phase"] == "ar"


def test_a_batch_cut_short_is_kept_apart_from_the_steady_mean(tmp_path):
    """A job stopped inside its third batch (1 of 2 optimizer steps): that batch is listed, incomplete, and neither
    its wall nor its train time enters the mean (nor the train MFU, FLOPs of a whole batch over its time)."""
    metrics = write_metrics(tmp_path / "metrics.jsonl", [
        step(0, 50.0, call=4, rollout_s=30.0, train=5.0), step(0, 55.0, call=4, train=5.0),
        step(1, 85.0, call=4, rollout_s=20.0, train=5.0), step(1, 90.0, call=4, train=5.0),
        step(2, 115.0, call=4, rollout_s=20.0, train=5.0),
    ])
    row = e2e.summarise(e2e.rollout_batches(metrics, e2e.BatchPlan("decoder", per_batch=2)), 8, 1, {"train": 1e15})
    last = row["batches"][-1]
    assert (last["steps"], last["full_steps"], last["complete"], last["steady"]) == (1, 2, False, False)
    assert row["steady_n"] == 1 and row["s_per_rl_step"] == pytest.approx(35.0)
    assert row["train_s"] == pytest.approx(10.0) and row["mfu_train"] == pytest.approx(1e14 / e2e.C.PEAK_BF16_FLOPS)
    assert row["optimizer_steps"] == 5 and row["rollouts"] == 3


def test_a_batch_at_a_new_rollout_call_size_is_warm_up(tmp_path):
    """Auto rollout batches: the first batch measures with calls of one unit (4), the second runs the chosen size
    (16) for the first time; only the later batches at an unchanged size are steady."""
    metrics = write_metrics(tmp_path / "metrics.jsonl", [
        step(0, 100.0, call=4, rollout_s=60.0, train=10.0), step(1, 170.0, call=16, rollout_s=50.0, train=10.0),
        step(2, 200.0, call=16, rollout_s=20.0, train=5.0), step(3, 232.0, call=16, rollout_s=20.0, train=5.0),
    ])
    row = e2e.summarise(e2e.rollout_batches(metrics, e2e.BatchPlan("ar", per_batch=1)), 16, 1)
    assert [b["warmup"] for b in row["batches"]] == [True, True, False, False]
    assert row["steady_n"] == 2 and row["s_per_rl_step"] == pytest.approx(31.0)
    assert row["first_rl_step_s"] == 100.0 and row["warmup_s"] == pytest.approx(170.0)
    assert row["rollout_frac"] == pytest.approx(20.0 / 31.0)


def test_a_run_without_a_steady_batch_shows_no_figures(tmp_path):
    metrics = write_metrics(tmp_path / "metrics.jsonl", [
        step(0, 90.0, call=4, rollout_s=60.0, train=10.0), step(0, 100.0, call=4, train=10.0),
        step(1, 160.0, call=16, rollout_s=40.0, train=10.0), step(1, 170.0, call=16, train=10.0),
        step(2, 180.0, call=16, rollout_s=8.0, train=1.0),  # stopped here: 1 of 2 steps
    ])
    plan = e2e.BatchPlan("decoder", per_batch=2)
    row = e2e.summarise(e2e.rollout_batches(metrics, plan), 16, 1, {"rollout": 1e15, "train": 1e15})
    assert row["steady_n"] == 0 and row["note"] == "no steady batch"
    assert all(row[k] is None for k in ("s_per_rl_step", "gpu_s_per_sample", "rollout_frac", "train_frac",
                                        "mfu_rollout", "mfu_train"))
    assert row["first_rl_step_s"] == 100.0 and row["warmup_s"] == pytest.approx(170.0)
    assert [b["complete"] for b in row["batches"]] == [True, True, False]
    assert plan.steps_for(3) == 6


def test_joint_batches_are_complete_at_their_phase_end_and_warm_up_per_stage(tmp_path):
    """Phases of 3 AR and 1 decoder optimizer steps, 2 steps a batch: AR batches of 2 then 1 (the phase's end),
    decoder batches of 1. Each stage's first batch is warm-up, and a call size is compared with the same stage's."""
    rows = []
    for cycle, elapsed in enumerate((100.0, 200.0, 300.0)):
        base = cycle * 3
        rows += [step(base, elapsed - 40, "ar", call=8, train=1.0), step(base, elapsed - 35, "ar", call=8, train=1.0),
                 step(base + 1, elapsed - 20, "ar", call=8, train=1.0), step(base + 2, elapsed, "decoder", call=4)]
    plan = e2e.BatchPlan("joint", per_batch=2, phases=(3, 1))
    batches = e2e.rollout_batches(write_metrics(tmp_path / "metrics.jsonl", rows), plan)
    assert [(b["phase"], b["steps"], b["full_steps"]) for b in batches] == [("ar", 2, 2), ("ar", 1, 1), ("decoder", 1, 1)] * 3
    assert all(b["complete"] for b in batches)
    assert [b["steady"] for b in batches] == [False, True, False] + [True] * 6
    assert plan.steps_for(3) == 12  # the decoder's third batch ends the third cycle of 4 steps


def test_batch_plan_follows_the_trainer_and_the_joint_phases(tiny_release_work):
    """Steps of a batch from a real config (2 epochs, 2 minibatches accumulated); a joint batch's stage and steps
    match ``tandem.rl.session.joint_phase`` at every step; the compile caches are not in the run folder (which the
    benchmark removes before each launch)."""
    from tandem.rl.session import joint_phase

    args = SimpleNamespace(model=str(tiny_release_work / "tiny-pipe"), extras=str(tiny_release_work / "tiny-extras"))
    sets = ["output_dir=/tmp/run", "grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.mini_batch_size=2",
            "grpo.num_iterations=2", "optim.gradient_accumulation_steps=2", "joint.ar_steps_per_phase=5",
            "joint.decoder_steps_per_phase=3"]
    for stage in ("ar", "decoder", "joint"):
        cfg = e2e.job_config(args, stage, sets)
        plan = e2e.BatchPlan.of(cfg, stage)
        assert plan.per_batch == 2 * 16 // (2 * 2) and plan.phases == ((5, 3) if stage == "joint" else None)
        assert "/tmp/run" not in str(e2e.Path(cfg.model.compile_cache_dir).expanduser().resolve())
    cfg.max_steps = 10**6
    for done in range(40):
        phase, start, stop = joint_phase(cfg, done)
        assert plan.batch_at(done) == (phase, min(plan.per_batch, stop - done))
def test_dit_forward_flops_of_a_saved_transformer(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text('{"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 3}')
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text('{"metadata": {"total_size": 2000}}')
    tokens = (64 // 16) * (128 // 16)  # 32 patch tokens
    assert e2e.dit_forward_flops(tmp_path, 64, 128) == 2 * 1000 * tokens + 4 * 3 * tokens**2 * 16
    assert e2e.dit_forward_flops(tmp_path / "missing", 64, 128) is None


def test_reward_override_is_a_list_of_entries(tmp_path):
    text = e2e.reward_entries(tmp_path, tiny=False, with_ocr=True, with_hands=True, stage="decoder")
    rewards = OmegaConf.to_container(OmegaConf.from_dotlist([text]))["rewards"]
    assert [r["name"] for r in rewards] == ["lpips", "aesthetic", "ocr", "hands"]
    assert rewards[0]["args"]["backbone_weights"] == f"{tmp_path}/alexnet.safetensors"
    assert rewards[1]["num_gpus"] == 0.1
    ar = OmegaConf.to_container(OmegaConf.from_dotlist([e2e.reward_entries(tmp_path, True, False, False, "ar")]))["rewards"]
    assert [r["name"] for r in ar] == ["aesthetic", "vlm"] and ar[0]["args"]["model_name"] == "ViT-B-32"
