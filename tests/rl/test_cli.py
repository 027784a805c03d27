"""The `tandem` CLI and config loading: dry run, and user mistakes as one stderr line with exit code 2."""

import subprocess
import sys

import pytest

from tests.cli_run import assert_user_mistake, tandem_cli
from tandem.rl.config import ConfigError, load_config

pytestmark = pytest.mark.slow  # CLI runs


def tandem(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "tandem.rl.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_dry_run_prints_the_resolved_config():
    proc = tandem("train", "ar", "--config", "configs/demo/ar.yaml", "--dry-run", "grpo.beta=0.02")
    assert proc.returncode == 0, proc.stderr
    assert "beta: 0.02" in proc.stdout
    assert "epsilon_high: 0.2" in proc.stdout  # stage default resolved
    assert "num_generations: 8" in proc.stdout


def test_a_mistake_is_one_stderr_line_from_the_real_process():
    """The entry point's own process: nothing else (import warnings, logging set-up) reaches stderr. The other
    user-mistake tests call the same ``main`` in the test process (tests/cli_run.py)."""
    proc = tandem("train", "decoder", "--config", "configs/demo/decoder.yaml", "--dry-run", "grpo.beta=-1")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("tandem: error: ") and "grpo.beta" in proc.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "ar", "--config", "configs/demo/ar.yaml", "--dry-run", "bogus.key=1"], "bogus.key"),
        (["train", "ar", "--config", "configs/demo/ar.yaml", "--dry-run", "seed=abc"], "'seed'"),
        (["train", "ar", "--config", "configs/demo/ar.yaml", "--dry-run", "grpo.loss_type=ppo"], "grpo.loss_type"),
        (["train", "ar", "--config", "configs/demo/missing.yaml", "--dry-run"], "configs/demo/missing.yaml"),
        (["train", "decoder", "--config", "configs/demo/decoder.yaml", "--dry-run", "data.prompts=nope.jsonl"], "nope.jsonl"),
        (["train", "decoder", "--config", "configs/demo/decoder.yaml", "--dry-run", "grpo.mini_batch_size=3"], "grpo.mini_batch_size"),
        (["train", "ar", "--config", "configs/demo/ar.yaml", "--dry-run", "ar.sampler=vllm"], "ar.sampler"),
        (["train", "ar", "--config", "configs/demo/ar.yaml", "--dry-run", "ar.sampler=engine", "distributed.strategy=fsdp"],
         "ar.sampler"),
        (["train", "sideways", "--config", "configs/demo/ar.yaml"], "sideways"),
        (["sample", "--config", "configs/demo/sample.yaml", "model.path=/nonexistent", "model.create_tiny_if_missing=false"], "model.path"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(args, needle):
    assert_user_mistake(tandem_cli(*args), needle)


def test_yaml_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\nmodel: {path: p}\ndata: {prompts: data/demo_prompts.jsonl, height: [1]}\n")
    with pytest.raises(ConfigError, match="data.height"):
        load_config(str(bad), stage="sample")
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad), stage="sample")
    bad.write_text("model: {path: p}\ndata: {prompts: data/demo_prompts.jsonl}\n")
    with pytest.raises(ConfigError, match="output_dir"):
        load_config(str(bad), stage="sample")


def test_sample_command_writes_a_grid(tiny_model_path, tmp_path):
    proc = tandem_cli("sample", "--config", "configs/demo/sample.yaml", f"model.path={tiny_model_path}",
                  f"output_dir={tmp_path}", "--num-prompts", "2", "decoder.eval_num_steps=2")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "samples" / "sample.png").is_file()
    assert (tmp_path / "config.yaml").is_file()


@pytest.mark.parametrize("stage, first_weights", [("ar", "reward 'aesthetic' needs args.clip_weights"),
                                                  ("decoder", "reward 'lpips' needs args.backbone_weights")])
def test_real_weight_configs_validate(stage, first_weights):
    config = ["train", stage, "--config", f"configs/glm_image/{stage}.yaml", "--dry-run", "data.prompts=data/demo_prompts.jsonl"]
    proc = tandem_cli(*config, "rewards=[{name: ocr}]")
    assert proc.returncode == 0, proc.stderr
    assert "lora:\n    enabled: true" in proc.stdout
    proc = tandem_cli(*config)  # the dry run checks reward weight paths: the release weights are not on this machine
    assert proc.returncode == 2 and first_weights in proc.stderr, proc.stderr
