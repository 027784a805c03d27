"""tandem's GRPO knobs carry TRL's names and meanings (`trl.GRPOConfig`, the installed TRL): this test fails
the day either side renames a knob, drops a choice tandem offers, or changes what a shared default means."""

import dataclasses
import re

import pytest
import trl

from tandem.rl.advantages import AGGREGATIONS, SCALES
from tandem.rl.config import STAGE_DEFAULTS, GRPOConfig, JobConfig, apply_stage_defaults
from tandem.rl.losses import LOSS_TYPES

pytestmark = pytest.mark.slow  # imports trl and builds its config

KNOBS = ("num_generations", "epsilon", "epsilon_high", "beta", "loss_type", "scale_rewards",
         "multi_objective_aggregation", "num_iterations")
CHOICES = {"loss_type": LOSS_TYPES.names(), "scale_rewards": SCALES.names(),
           "multi_objective_aggregation": AGGREGATIONS.names()}
TRL_FIELDS = {f.name: f for f in dataclasses.fields(trl.GRPOConfig)}


def trl_config(tmp_path, **kwargs):
    return trl.GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, **kwargs)


def test_every_knob_has_the_same_name_in_trl():
    ours = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert set(KNOBS) <= ours
    assert [k for k in KNOBS if k not in TRL_FIELDS] == []


@pytest.mark.parametrize("knob", sorted(CHOICES))
def test_every_choice_tandem_offers_is_a_trl_choice(knob, tmp_path):
    doc = TRL_FIELDS[knob].metadata["help"]
    for value in CHOICES[knob]:
        assert re.search(f"[`']{value}[`']", doc), f"TRL's {knob} help does not list {value!r}"
        assert getattr(trl_config(tmp_path, **{knob: value}), knob) == value  # TRL's own validation accepts it


def test_shared_defaults_mean_the_same(tmp_path):
    ours, theirs = GRPOConfig(), trl_config(tmp_path)
    for knob in ("beta", "num_iterations", "scale_rewards", "multi_objective_aggregation"):
        assert getattr(ours, knob) == getattr(theirs, knob), knob
    # the AR stage clips like TRL: epsilon 0.2, and epsilon_high unset = the same as epsilon
    assert STAGE_DEFAULTS["ar"]["epsilon"] == TRL_FIELDS["epsilon"].default
    job = JobConfig(output_dir="x")
    apply_stage_defaults(job, "ar")
    assert TRL_FIELDS["epsilon_high"].default is None
    assert "defaults to the same value as the lower-bound" in TRL_FIELDS["epsilon_high"].metadata["help"]
    assert job.grpo.epsilon_high == job.grpo.epsilon == theirs.epsilon
