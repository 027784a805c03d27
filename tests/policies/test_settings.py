"""``PolicySettings``: a policy reads its own config section and a few shared values, never the job config."""

import dataclasses

import pytest

from tandem.policies.glm_image import load_pipeline
from tandem.policies.settings import PolicySettings
from tandem.rl.config import JobConfig
from tandem.rl.session import build_policy

pytestmark = pytest.mark.usefixtures("one_thread")


def job(path) -> JobConfig:
    cfg = JobConfig(output_dir="unused")
    cfg.model.path, cfg.model.device = str(path), "cpu"
    cfg.data.height, cfg.data.width = 64, 48
    cfg.grpo.beta, cfg.grpo.nft_old_decay_type = 0.04, 1
    cfg.optim.gradient_checkpointing, cfg.optim.mixed_precision = True, "bf16"
    cfg.decoder.edit = True
    return cfg


@pytest.mark.parametrize("stage", ["ar", "decoder"])
def test_settings_carry_the_stage_section_and_the_shared_values_only(stage):
    cfg = job("unused")
    s = PolicySettings.from_job(cfg, stage)
    assert s.section is getattr(cfg, stage)
    assert (s.height, s.width, s.gradient_checkpointing, s.dtype, s.mixed_precision) == (64, 48, True, "float32", "bf16")
    assert s.lora is cfg.optim.lora
    assert s.keeps_reference and s.old_decay_type == 1 and s.compile_decoder is False
    assert s.edit is (stage == "decoder")  # each stage's own edit key
    fields = {f.name for f in dataclasses.fields(s)}
    assert not fields & {"grpo", "rewards", "optim", "data", "model", "distributed", "ar", "decoder"}
    assert not PolicySettings.from_job(dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, beta=0.0)),
                                       stage).keeps_reference


@pytest.mark.parametrize("stage", ["ar", "decoder"])
def test_a_built_policy_holds_no_job_config(tiny_model_path, stage):
    cfg = job(tiny_model_path)
    cfg.decoder.edit = cfg.optim.gradient_checkpointing = False
    policy = build_policy(stage, cfg, load_pipeline(str(tiny_model_path), device="cpu"))
    assert not hasattr(policy, "cfg")
    assert policy.settings == PolicySettings.from_job(cfg, stage)
    held = [name for name, value in vars(policy).items() if isinstance(value, JobConfig)]
    assert not held, f"the policy holds the job config as {held}"
