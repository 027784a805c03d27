"""AR token samplers: the registered choices of ``ar.sampler``, each with its own config rules and capabilities.

A token sampler is the AR policy's rollout decode loop (a ``TokenSampler``, ``tandem.policies.ar_sampler``). Each
``ar.sampler`` value is a ``TokenSamplerKind`` in ``TOKEN_SAMPLERS``; the AR policy builds its sampler from it, the
model family validates the choice through it (``validate``) and the trainer learns from the policy whether the
rollout's log-probs are the training forward's (``rollout_matches_training``). A new sampler is one
``TOKEN_SAMPLERS.register("name")(TokenSamplerKind(...))``; config validation lists the registry's names.

Registered:

* ``generate`` (the default and the reference) — transformers' ``generate`` with a dynamic KV cache
  (``GenerateSampler``). In float32 without ``ar.compile`` its log-probs are the teacher-forced training forward's
  to rounding, so the first on-policy ratio is 1 without a recompute.
* ``engine`` — ``policies/ar_engine.py``'s ``StaticCacheSampler``: a static KV cache, one decode step captured as a
  CUDA graph on CUDA, and with ``ar.compile`` that step through ``torch.compile``; the same tokens and stored
  log-probs as ``generate``, but another kernel layout than training's, so ``grpo.old_log_probs: auto``
  recomputes them. It takes text-to-image prompts only (no source images: not with ``ar.edit``) and runs the
  layers outside the root forward (not with ``distributed.strategy: fsdp``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from tandem.core.errors import require
from tandem.core.registry import Registry
from tandem.policies.base import edits


def no_rules(cfg: Any, stage: str) -> None:
    """A sampler without config rules of its own."""


@dataclass(frozen=True)
class TokenSamplerKind:
    """One ``ar.sampler`` choice.

    Attributes:
        name: the ``ar.sampler`` value.
        build: ``build(settings)`` -> the ``TokenSampler`` of the AR policy's ``PolicySettings``
            (``policies.settings``; ``settings.section`` is the ``ar`` config).
        matches_training: ``matches_training(settings)`` -> whether a rollout's stored log-probs equal the
            training forward's (same numerics: then the first on-policy ratio is 1 without recomputing them).
        rules: ``rules(cfg, stage)`` raises ConfigError (one line) for settings the sampler cannot run; called for
            a job that trains the AR stage.
    """

    name: str
    build: Callable[[Any], Any]
    matches_training: Callable[[Any], bool]
    rules: Callable[[Any, str], None] = no_rules

    def validate(self, cfg: Any, stage: str) -> None:
        self.rules(cfg, stage)

    def rollout_matches_training(self, settings: Any) -> bool:
        return bool(self.matches_training(settings))


TOKEN_SAMPLERS: Registry[TokenSamplerKind] = Registry("token sampler")
DEFAULT_TOKEN_SAMPLER = "generate"


def token_sampler(name: str) -> TokenSamplerKind:
    """The registered ``ar.sampler`` ``name`` (ConfigError listing the registered names)."""
    return TOKEN_SAMPLERS.get(name, "ar.sampler")


def register_token_sampler(kind: TokenSamplerKind) -> TokenSamplerKind:
    TOKEN_SAMPLERS.register(kind.name)(kind)
    return kind


def full_precision(settings: Any) -> bool:
    """float32 weights and no autocast: rollout and training forwards round alike."""
    return settings.dtype == "float32" and settings.mixed_precision == "no"


def _build_generate(settings: Any):
    from tandem.policies.ar_sampler import GenerateSampler

    return GenerateSampler()


def _build_engine(settings: Any):
    from tandem.policies.ar_engine import StaticCacheSampler  # imports transformers' attention registry

    return StaticCacheSampler(use_cuda_graph=True, compile=settings.section.compile)


def _engine_rules(cfg: Any, stage: str) -> None:
    require(not edits(cfg, "ar"), "ar.sampler", "'engine' takes text-to-image prompts only (no source images as "
            "pixel_values); with ar.edit use ar.sampler=generate")
    require(cfg.distributed.strategy != "fsdp", "ar.sampler", "'engine' runs the layers outside the sharded root "
            "forward (and captures them in a CUDA graph); with distributed.strategy=fsdp use ar.sampler=generate")


GENERATE = register_token_sampler(TokenSamplerKind(
    name="generate", build=_build_generate, matches_training=lambda s: full_precision(s) and not s.section.compile))
ENGINE = register_token_sampler(TokenSamplerKind(
    name="engine", build=_build_engine, matches_training=lambda s: False, rules=_engine_rules))
