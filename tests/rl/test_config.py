"""Settings that cannot train, or that would fail late, are one-line config errors (exit 2) before anything loads."""

import pytest

from tandem.rl.cli import main
from tests.cli_run import assert_user_mistake, tandem_cli

DECODER = ["train", "decoder", "--config", "configs/demo/decoder.yaml", "--dry-run"]
AR = ["train", "ar", "--config", "configs/demo/ar.yaml", "--dry-run"]
EDIT_AR = ["--config", "configs/demo/edit_ar.yaml", "--dry-run"]
NFT = ["train", "decoder", "--config", "configs/demo/decoder_nft.yaml", "--dry-run"]


@pytest.mark.parametrize("args, key", [
    (DECODER + ["decoder.noise_level=0"], "decoder.noise_level"),
    (DECODER + ["decoder.sde_type=cps", "decoder.noise_level=1.5"], "decoder.noise_level"),
    (DECODER + ["optim.learning_rate=0"], "optim.learning_rate"),
    (DECODER + ["optim.learning_rate=-1e-4"], "optim.learning_rate"),
    (AR + ["ar.temperature=0"], "ar.temperature"),
    (AR + ["ar.top_p=0"], "ar.top_p"),
    (AR + ["ar.top_p=1.5"], "ar.top_p"),
    (AR + ["ar.top_k=-1"], "ar.top_k"),
    (DECODER + ["decoder.ema_decay=1.0"], "decoder.ema_decay"),
    (DECODER + ["decoder.ema_decay=-0.1"], "decoder.ema_decay"),
    (DECODER + ["optim.lora.r=0"], "optim.lora.r"),
    (DECODER + ["optim.max_grad_norm=-1"], "optim.max_grad_norm"),
    (DECODER + ["eval.num_prompts=-1"], "eval.num_prompts"),
    (DECODER + ["decoder.eval_num_steps=0"], "decoder.eval_num_steps"),
    (DECODER + ["seed=-1"], "seed"),
    (DECODER + ["model.device=banana"], "model.device"),
    (DECODER + ["rewards=[{name: color, max_restarts: -2}]"], "rewards[0].max_restarts"),
    (DECODER + ["rewards=[{name: color, weight: .nan}]"], "rewards[0].weight"),
    (DECODER + ["rewards=[{name: color, weight: .inf}]"], "rewards[0].weight"),
    (DECODER + ["rewards=[{name: color, batch_size: -1}]"], "rewards[0].batch_size"),
    (DECODER + ["decoder.kl_form=k3"], "decoder.kl_form"),
    (DECODER + ["decoder.ema_update_interval=0"], "decoder.ema_update_interval"),
    (NFT + ["decoder.guidance_scale=1.5"], "decoder.guidance_scale=1"),  # v_old, v_θ, v_ref are unguided
    (NFT + ["grpo.nft_old_decay_type=3"], "grpo.nft_old_decay_type"),
    (NFT + ["grpo.nft_beta=0"], "grpo.nft_beta"),
    (DECODER + ["grpo.nft_old_decay_type=1"], "grpo.nft_old_decay_type"),  # DiffusionNFT's, not flow-GRPO's
    (DECODER + ["decoder.sde_window_end=wrap"], "decoder.sde_window_end"),
    (["train", "ar"] + EDIT_AR + ["ar.sampler=engine"], "ar.sampler=generate"),  # engine takes no pixel_values
    (["train", "joint"] + EDIT_AR + ["decoder.edit=false"], "decoder.edit"),  # a joint job edits in both stages
    (["train", "joint"] + EDIT_AR + ["ar.edit=false", "decoder.edit=true"], "ar.edit"),
    (["sample", "--config", "configs/demo/sample.yaml", "--num-prompts", "0"], "--num-prompts"),
    (["eval", "--config", "configs/demo/sample.yaml", "--batch-size", "0"], "--batch-size"),
])
def test_bad_setting_is_one_line_exit_2(args, key):
    assert_user_mistake(tandem_cli(*args), key)


@pytest.mark.parametrize("args", [
    DECODER + ["decoder.sde_type=cps", "decoder.noise_level=1.0"],
    DECODER + ["optim.max_grad_norm=0"],
    DECODER + ["model.device=cuda:1", "eval.num_prompts=0", "decoder.ema_decay=0"],
    AR + ["decoder.noise_level=0", "ar.top_p=1", "ar.top_k=0"],  # the AR stage's frozen decoder renders by ODE
    ["train", "joint"] + EDIT_AR + ["decoder.edit=true"],
    NFT + ["grpo.nft_old_decay_type=2", "grpo.nft_adaptive_weight=true", "grpo.nft_scale_policy_loss=true",
           "grpo.nft_fresh_noise=true", "grpo.num_iterations=2"],
    DECODER + ["decoder.sde_window_schedule=sliding", "decoder.sde_window_end=shrink"],
])
def test_edge_values_stay_valid(args, capsys):
    assert main(args) == 0, capsys.readouterr().err
