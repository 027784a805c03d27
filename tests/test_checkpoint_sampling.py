"""Trained weights from a checkpoint load back into a GlmImagePipeline (what `tandem sample/eval --checkpoint` do)."""

import pytest
import torch
from safetensors.torch import load_file

from tandem.policies.glm_image import load_pipeline
from tandem.policies.families import get_family
from tandem.rl.checkpoint import load_trained_weights
from tandem.rl.config import load_config
from tandem.rl.session import train

pytestmark = pytest.mark.slow  # end-to-end jobs


@pytest.mark.parametrize("stage, lora", [("decoder", True), ("ar", False)])
def test_checkpoint_weights_load_into_the_pipeline(tiny_model_path, tmp_path, stage, lora):
    overrides = [f"output_dir={tmp_path}", f"model.path={tiny_model_path}", "max_steps=2", "logging.progress=false",
                 "reward_host.backend=local", "logging.sample_every=0", "optim.learning_rate=0.05",
                 f"optim.lora.enabled={str(lora).lower()}"]
    run = train(load_config(f"configs/demo/{stage}.yaml", overrides, stage=stage), stage)
    checkpoint = run / "checkpoints" / "step_2"
    saved = load_file(str(checkpoint / f"{stage}.trained.safetensors"))
    assert saved and all(("lora_" in k) == lora for k in saved)

    base, trained = load_pipeline(str(tiny_model_path)), load_pipeline(str(tiny_model_path))
    load_trained_weights(trained, str(checkpoint), get_family("glm_image").components)
    module = trained.transformer if stage == "decoder" else trained.vision_language_encoder
    params = dict(module.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in saved.items())
    before = base.transformer if stage == "decoder" else base.vision_language_encoder
    changed = [k for k, v in before.state_dict().items() if k in params and not torch.equal(params[k], v)]
    assert lora or changed  # full fine-tuning replaced base weights; LoRA added adapter weights on top
