"""Each config choice is validated by the object that owns it: a model family, an objective and a token sampler
registered here with rules of their own are checked by `tandem train ... --dry-run` (one stderr line, exit 2),
and the generic trainer (`rl/`) names no family and no token sampler."""

import re
from pathlib import Path

import pytest

from tandem.core.errors import require
from tandem.policies.base import edits
from tandem.policies.families import BUILTIN, FAMILIES, ModelFamily, register_family
from tandem.policies.token_samplers import TOKEN_SAMPLERS, TokenSamplerKind, register_token_sampler
from tandem.rl.objectives import OBJECTIVES
from tests.cli_run import assert_user_mistake, tandem_cli

ROOT = Path(__file__).resolve().parents[2]
DECODER = ["train", "decoder", "--config", "configs/demo/decoder.yaml", "--dry-run"]
AR = ["train", "ar", "--config", "configs/demo/ar.yaml", "--dry-run"]


def _fake_family_rules(cfg, stage):
    require(cfg.decoder.guidance_scale != 7.0, "decoder.guidance_scale", "test_fake_family cannot guide at 7")


def _fake_sampler_rules(cfg, stage):
    require(cfg.ar.temperature == 0.5, "ar.temperature", "test_fake_sampler samples at temperature 0.5 only")


class FakeObjective:
    """Trains the decoder stage; refuses a KL coefficient above 0.5 (its own rule)."""

    stages = ("decoder",)
    uses_old_log_probs = True

    @staticmethod
    def validate(job, stage):
        require(job.grpo.beta <= 0.5, "grpo.beta", "test_fake_objective takes beta <= 0.5")


@pytest.fixture(scope="module", autouse=True)
def fakes():
    """A decoder-only family that cannot edit, an objective and a token sampler, each with its own rule."""
    register_family(ModelFamily(name="test_fake_family", load=lambda model_cfg: None,
                                policies={"decoder": lambda pipe, settings: None},
                                components={"decoder": "transformer"},
                                generate=lambda pipe, prompts, cfg, seed: None, rules=_fake_family_rules))
    OBJECTIVES.register("test_fake_objective")(FakeObjective)
    register_token_sampler(TokenSamplerKind(name="test_fake_sampler", build=lambda settings: None,
                                            matches_training=lambda settings: True, rules=_fake_sampler_rules))
    yield
    FAMILIES._entries.pop("test_fake_family")
    OBJECTIVES._entries.pop("test_fake_objective")
    TOKEN_SAMPLERS._entries.pop("test_fake_sampler")


@pytest.mark.parametrize("args, needles", [
    (DECODER + ["model.family=test_fake_family", "decoder.guidance_scale=7"],
     ["decoder.guidance_scale", "test_fake_family cannot guide at 7"]),  # the family's own rule
    (DECODER + ["model.family=test_fake_family", "decoder.edit=true", "decoder.condition_source=reference"],
     ["decoder.edit", "'test_fake_family' cannot edit images in the decoder stage"]),  # its declared capability
    (AR + ["model.family=test_fake_family"], ["model.family", "'test_fake_family' has no ar stage"]),
    (DECODER + ["grpo.objective=test_fake_objective", "grpo.beta=0.9"],
     ["grpo.beta", "test_fake_objective takes beta <= 0.5"]),
    (AR + ["ar.sampler=test_fake_sampler"], ["ar.temperature", "test_fake_sampler samples at temperature 0.5 only"]),
    (AR + ["ar.sampler=nope"], ["ar.sampler", "engine, generate, test_fake_sampler"]),  # the registry's names
])
def test_dry_run_reports_each_owners_rule_as_one_line(args, needles):
    line = assert_user_mistake(tandem_cli(*args))
    assert all(n in line for n in needles), line


@pytest.mark.parametrize("args", [
    DECODER + ["model.family=test_fake_family", "decoder.guidance_scale=1.5"],
    DECODER + ["grpo.objective=test_fake_objective", "grpo.beta=0.5"],
    AR + ["ar.sampler=test_fake_sampler", "ar.temperature=0.5"],
    DECODER + ["ar.sampler=test_fake_sampler"],  # a sampler's rules hold where the AR stage trains
])
def test_what_the_owners_allow_passes(args):
    proc = tandem_cli(*args)
    assert proc.returncode == 0, proc.stderr


def test_editing_is_one_decision_per_stage():
    from tandem.rl.config import JobConfig

    cfg = JobConfig(output_dir="unused")
    cfg.ar.edit = True
    assert edits(cfg, "ar") and edits(cfg, "joint") and not edits(cfg, "decoder")


def _names_in_rl():
    """(pattern, what it names): the built-in families in any spelling, the token samplers' names where they are
    the value of ar.sampler or quoted (not ``generate``, the family's pipeline call), and their modules and classes."""
    samplers = [n for n in TOKEN_SAMPLERS.names() if not n.startswith("test_")]
    yield from ((re.compile(rf"\b{re.escape(f).replace('_', '[-_ ]?')}\b", re.I), f"model family {f}") for f in BUILTIN)
    yield re.compile(r"GlmImage", re.I), "model family glm_image (class names)"
    for name in samplers:
        yield re.compile(rf"[\"']{name}[\"']|sampler\s*[=:]\s*{name}\b|\b{name}\s+sampler"), f"token sampler {name}"
    yield re.compile(r"ar_engine|StaticCacheSampler|GenerateSampler"), "token sampler modules and classes"


def test_rl_names_no_family_and_no_token_sampler():
    """In code, docstrings and comments: such names and their rules belong to the families and samplers."""
    found = [f"{path.relative_to(ROOT)}:{i}: {what}: {line.strip()}"
             for path in sorted((ROOT / "rl").glob("*.py"))
             for i, line in enumerate(path.read_text().splitlines(), 1)
             for pattern, what in _names_in_rl() if pattern.search(line)]
    assert not found, "\n".join(found)


def test_the_name_check_can_fail(tmp_path):
    lines = ['family = "glm_image"', "# GLM-Image's layout", 'if cfg.ar.sampler == "engine":', "ar.sampler=generate",
             "use the sd3 family"]
    assert all(any(p.search(line) for p, _ in _names_in_rl()) for line in lines)
    assert not any(p.search("the family's generate call, an OCR engine") for p, _ in _names_in_rl())
