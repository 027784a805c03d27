"""Fakes that run the trainer, session, checkpoint and resume logic in a fraction of a second: a policy whose
actions are Gaussian draws around a few trained numbers (so GRPO's updates are real math), a model family that
builds it for both stages, and a reward that is a plain function. The tiny real models keep the numerics tests.

A sample is an action a ∈ R^D drawn from N(μ, σ²I) with μ the D trained parameters and σ fixed; its D units
are the D coordinates, log π(a_d) = −(a_d − μ_d)²/(2σ²) − log σ − ½ log 2π, and its image is one flat colour,
255·sigmoid(a_{0:3}). KL to the initial μ₀ per unit: (μ_d − μ₀_d)²/(2σ²) (two Gaussians of one variance).
"""

from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
from safetensors.torch import save_file

from tandem.core.seeds import derive_seed
from tandem.core.types import LogProbs, Rollout, group_ids_for
from tandem.policies.base import TrainedComponent
from tandem.policies.families import FAMILIES, ModelFamily, register_family

FAMILY = "test_fake_gaussian"
UNITS = 4  # D: trained numbers per stage, one unit each
SIGMA = 0.5
SIZE = 8  # images are SIZE x SIZE flat colours


class FakeModule(torch.nn.Module):
    """The trained component: D means, saved like a transformers model (one safetensors file)."""

    def __init__(self):
        super().__init__()
        self.mean = torch.nn.Parameter(torch.zeros(UNITS))

    def save_pretrained(self, folder, state_dict=None, safe_serialization=True):
        save_file({k: v.contiguous() for k, v in (state_dict or self.state_dict()).items()},
                  str(Path(folder) / "model.safetensors"))


class FakePolicy(TrainedComponent):
    """``tandem.core.protocols.Policy`` over ``FakeModule``: seeded Gaussian actions, exact log-probs and KL."""

    rollout_matches_training = True

    def __init__(self, stage: str):
        self.stage = stage
        self.trained_module = FakeModule()
        self.reference = self.trained_module.mean.detach().clone()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def _draw(self, seed: int, group: int, copy: int) -> torch.Tensor:
        noise = torch.randn(UNITS, generator=torch.Generator().manual_seed(derive_seed(seed, group, copy)))
        return self.trained_module.mean.detach() + SIGMA * noise

    def rollout(self, prompts: Sequence[str], metadata: Sequence[dict], group_size: int, seed: int,
                first_group: int = 0, first_copy: int = 0) -> Rollout:
        actions = torch.stack([self._draw(seed, first_group + g, first_copy + c)
                               for g in range(len(prompts)) for c in range(group_size)])
        return Rollout(images=images_of(actions), prompts=[p for p in prompts for _ in range(group_size)],
                       metadata=[dict(m) for m in metadata for _ in range(group_size)],
                       group_ids=group_ids_for(len(prompts), group_size),  # the trainer adds first_group
                       old_log_probs=self._log_prob(actions).detach(), mask=torch.ones_like(actions),
                       extras={"actions": actions})

    def _log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        return torch.distributions.Normal(self.trained_module.mean, SIGMA).log_prob(actions)

    def unit_chunks(self, batch: Rollout) -> List[slice]:
        return [slice(0, UNITS // 2), slice(UNITS // 2, UNITS)]

    def log_probs(self, batch: Rollout, chunk: slice, with_kl: bool) -> LogProbs:
        actions = batch.extras["actions"][:, chunk]
        mean = self.trained_module.mean[chunk]
        log_probs = torch.distributions.Normal(mean, SIGMA).log_prob(actions)
        kl = ((mean - self.reference[chunk]) ** 2 / (2 * SIGMA ** 2)).expand_as(actions) if with_kl else None
        return LogProbs(log_probs=log_probs, kl=kl)

    def sample(self, prompts: Sequence[str], metadata: Sequence[dict], seed: int) -> np.ndarray:
        return images_of(self.trained_module.mean.detach().expand(len(prompts), UNITS))

    def on_optimizer_step(self) -> None:
        pass

    def handoff(self, batch: Rollout) -> Dict[str, torch.Tensor]:
        return {}


def images_of(actions: torch.Tensor) -> np.ndarray:
    """(B, SIZE, SIZE, 3) uint8: each sample one flat colour, 255·sigmoid(a_{0:3})."""
    rgb = (torch.sigmoid(actions[:, :3]) * 255).round().to(torch.uint8).numpy()
    return np.ascontiguousarray(np.broadcast_to(rgb[:, None, None, :], (len(rgb), SIZE, SIZE, 3)))


def fake_reward(images, prompts, metadata):
    """FakeReward: the mean red of each image in [0, 1] (a plain function, as users write them)."""
    return (images[..., 0].reshape(len(images), -1).mean(axis=1) / 255.0).tolist()


def register_fake_family() -> ModelFamily:
    """Register ``test_fake_gaussian``: both stages, no pipeline to load (idempotent)."""
    if FAMILY in FAMILIES:
        return FAMILIES.get(FAMILY, "model.family")
    return register_family(ModelFamily(
        name=FAMILY, load=lambda model_cfg: None,
        policies={"ar": lambda pipe, settings: FakePolicy("ar"),
                  "decoder": lambda pipe, settings: FakePolicy("decoder")},
        components={"ar": "fake_ar", "decoder": "fake_decoder"},
        generate=lambda pipe, prompts, cfg, seed: images_of(torch.zeros(len(prompts), UNITS))))
