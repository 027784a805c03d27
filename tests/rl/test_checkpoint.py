"""Checkpoints in the libraries' own formats: each loads with plain diffusers / peft / transformers and gives the
outputs of tandem's live policy and of tandem's own loader; `tandem export` writes a loadable pipeline."""

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from tandem.core.types import PromptRecord
from tandem.policies.families import get_family
from tandem.policies.glm_image import load_pipeline
from tandem.rl.checkpoint import load_trained_weights, save_checkpoint
from tandem.rl.config import JobConfig, apply_stage_defaults
from tandem.rl.run_dir import RunDir
from tandem.rl.run_state import RunState
from tandem.rl.session import build_policy
from tandem.rl.trainer import StageTrainer

pytestmark = pytest.mark.slow  # jobs and tiny pipelines

COMPONENTS = get_family("glm_image").components
PROMPTS = Path(__file__).resolve().parents[2] / "data" / "demo_prompts.jsonl"


def checkpoint(stage, lora, tiny, out, ema=False):
    """A checkpoint of a policy whose trained weights (and EMA) moved away from the base: (cfg, policy, folder)."""
    cfg = JobConfig(output_dir=str(out))
    cfg.model.path, cfg.data.prompts = str(tiny), str(PROMPTS)
    cfg.optim.lora.enabled, cfg.optim.lora.r, cfg.optim.lora.alpha = lora, 4, 8  # alpha != r: strength must survive
    cfg.decoder.ema_decay = 0.5 if ema else 0.0
    apply_stage_defaults(cfg, stage)
    torch.manual_seed(0)
    policy = build_policy(stage, cfg)
    for _ in range(2 if ema else 1):  # "training" steps, each followed by the EMA update
        with torch.no_grad():
            for p in policy.trainable_parameters():
                p.add_(0.02 * torch.randn_like(p))
        policy.on_optimizer_step()
    trainer = StageTrainer(stage, cfg, policy, None, None, Accelerator(cpu=True), RunState(), [PromptRecord("a", {})],
                           num_steps=4)
    RunDir(str(out)).create(cfg)
    folder = save_checkpoint(out / "checkpoints", 1, {stage: trainer}, cfg, {"run_state": {}})
    return cfg, policy, folder


def tandem_loaded(tiny, folder, ema=False):
    pipe = load_pipeline(str(tiny))
    load_trained_weights(pipe, str(folder), COMPONENTS, ema=ema)
    return pipe


def velocity(policy, model):
    """The decoder's CFG velocity for one prompt at the first timestep (through the family's adapter)."""
    a = policy.adapter
    cond = a.conditions(["a red apple"], [{}], seed=0)
    timesteps, _ = a.schedule(4)
    with torch.no_grad():
        return a.velocity(model, a.initial_noise([0]), timesteps[0], cond, 1.5)


def test_decoder_lora_and_its_ema_load_with_plain_diffusers(tiny_model_path, tmp_path, one_thread):
    from diffusers import GlmImageTransformer2DModel
    from safetensors import safe_open

    _, policy, folder = checkpoint("decoder", True, tiny_model_path, tmp_path, ema=True)
    with safe_open(str(folder / "ema" / "transformer" / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert all(k.startswith("transformer.transformer_blocks.") and ".lora_" in k for k in f.keys())  # by name
    live = velocity(policy, policy.model)
    for ema in (False, True):
        plain = GlmImageTransformer2DModel.from_pretrained(str(tiny_model_path / "transformer"))
        plain.load_lora_adapter(str(folder / ("ema/transformer" if ema else "transformer")), use_safetensors=True)
        config = next(iter(plain.peft_config.values()))
        assert (config.r, config.lora_alpha) == (4, 8)
        ours = tandem_loaded(tiny_model_path, folder, ema=ema).transformer
        assert not any("lora" in n for n, _ in ours.named_parameters())  # merged
        v_plain, v_ours = velocity(policy, plain), velocity(policy, ours)
        torch.testing.assert_close(v_ours, v_plain, atol=1e-5, rtol=1e-5)
        if not ema:
            torch.testing.assert_close(v_plain, live, atol=1e-5, rtol=1e-5)
        else:
            with policy.ema.swapped(policy.trainable_parameters()):
                torch.testing.assert_close(v_plain, velocity(policy, policy.model), atol=1e-5, rtol=1e-5)
            assert (v_plain - live).abs().max() > 1e-4  # the EMA weights are not the trained ones


def test_ar_lora_loads_with_plain_peft(tiny_model_path, tmp_path, one_thread):
    from peft import PeftModel
    from transformers import GlmImageForConditionalGeneration

    _, policy, folder = checkpoint("ar", True, tiny_model_path, tmp_path)
    batch = policy.rollout(["a red apple"], [{}], group_size=2, seed=1)
    with torch.no_grad():
        live = policy._logits(policy.model, batch.extras)
        base = GlmImageForConditionalGeneration.from_pretrained(str(tiny_model_path / "vision_language_encoder"))
        plain = PeftModel.from_pretrained(base, str(folder / "vision_language_encoder"))
        assert (plain.peft_config["default"].r, plain.peft_config["default"].lora_alpha) == (4, 8)
        ours = tandem_loaded(tiny_model_path, folder).vision_language_encoder
        torch.testing.assert_close(policy._logits(plain, batch.extras), live, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(policy._logits(ours, batch.extras), live, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stage", ["decoder", "ar"])
def test_full_fine_tunes_are_save_pretrained_folders(tiny_model_path, tmp_path, stage, one_thread):
    from diffusers import GlmImageTransformer2DModel
    from transformers import GlmImageForConditionalGeneration

    _, policy, folder = checkpoint(stage, False, tiny_model_path, tmp_path)
    component = COMPONENTS[stage]
    cls = GlmImageTransformer2DModel if stage == "decoder" else GlmImageForConditionalGeneration
    plain = cls.from_pretrained(str(folder / component)).state_dict()
    ours = getattr(tandem_loaded(tiny_model_path, folder), component).state_dict()
    live = policy.trained_module.state_dict()
    assert plain.keys() == live.keys() == ours.keys()
    assert all(torch.equal(plain[k], live[k]) and torch.equal(ours[k], live[k]) for k in live)


def test_export_writes_a_pipeline_that_from_pretrained_loads(tiny_model_path, tmp_path, one_thread):
    from diffusers import GlmImagePipeline

    from tandem.rl.cli import main

    _, policy, folder = checkpoint("decoder", True, tiny_model_path, tmp_path / "run")
    out = tmp_path / "exported"
    assert main(["export", str(folder), str(out)]) == 0
    exported = GlmImagePipeline.from_pretrained(str(out))
    torch.testing.assert_close(velocity(policy, exported.transformer), velocity(policy, policy.model), atol=1e-5, rtol=1e-5)
    base = load_pipeline(str(tiny_model_path))
    frozen = [k for k, v in base.vae.state_dict().items() if not torch.equal(v, exported.vae.state_dict()[k])]
    assert not frozen  # the rest of the pipeline is the base's
    assert main(["export", str(folder), str(out)]) == 2  # never writes over a folder
    assert main(["export", str(folder), str(tmp_path / "ema"), "--ema"]) == 2  # this run kept no EMA
    assert not (tmp_path / "ema").exists()
