"""Reward registry and construction: names, import paths, entry-point plugins, errors that name the fix."""

import numpy as np
import pytest
import torch

from tandem.rewards.base import (
    RewardConfigError,
    RewardError,
    build_reward,
    check_entries,
    list_rewards,
    register,
    resolve,
    to_scores,
    unique_labels,
)
from tandem.rewards.client import RewardClient
from tandem.rl.config import ConfigError, RewardEntry

BUILTINS = {"ocr", "hands", "aesthetic", "vlm", "lpips", "jpeg_compressibility", "brightness", "color"}


def test_builtins_are_listed_with_one_line_docs():
    listed = dict(list_rewards())
    assert BUILTINS <= set(listed)
    assert all(doc and "\n" not in doc for doc in listed.values())


def test_register_refuses_duplicates_and_keeps_groupwise():
    @register("test-only-pairwise", groupwise=True)
    def pairwise(images, prompts, metadata):
        """Pairwise test reward."""
        return [0.0] * len(images)

    with pytest.raises(ValueError, match="'test-only-pairwise' is already registered"):
        register("test-only-pairwise")(lambda images, prompts, metadata: [])
    spec = resolve("test-only-pairwise")
    assert spec.groupwise and spec.doc == "Pairwise test reward."
    assert build_reward(RewardEntry(name="test-only-pairwise")).groupwise
    with pytest.raises(ValueError, match="'brightness' is already registered by tandem.rewards.simple.brightness"):
        register("brightness")(pairwise)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(RewardConfigError, match=r"unknown reward 'ocrr'; registered: .*brightness.*ocr.*package.module:attr"):
        build_reward(RewardEntry(name="ocrr"))
    assert issubclass(RewardConfigError, ConfigError)


def test_import_path_function_and_class_with_args(plugin_path):
    fn = build_reward(RewardEntry(fn="tests.reward_plugins:mean_red", args={"scale": 2.0}))
    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[1, ..., 0] = 255
    assert fn.name == "mean_red" and not fn.groupwise
    np.testing.assert_allclose(fn(images, ["a", "b"], [{}, {}]), [0.0, 2.0])
    cls = build_reward(RewardEntry(fn="tests.reward_plugins:PromptLength", args={"offset": 10}, name="len"))
    assert cls.name == "len"  # name labels an fn entry
    np.testing.assert_array_equal(cls(images, ["abc", ""], [{}, {}]), [13.0, np.nan])
    assert build_reward(RewardEntry(fn="tests.reward_plugins:GroupSize")).groupwise  # class attribute


@pytest.mark.parametrize(
    "entry, message",
    [
        (RewardEntry(fn="no_such_module:fn"), "cannot import module 'no_such_module'"),
        (RewardEntry(fn="tests.reward_plugins:missing"), "has no attribute 'missing'"),
        (RewardEntry(fn="math:pi"), "is not callable"),
        (RewardEntry(fn=":fn"), "is not an import path"),
        (RewardEntry(fn="tests.reward_plugins:PromptLength", args={"offsett": 1}), r"reward 'PromptLength': bad rewards\[\].args"),
        (RewardEntry(fn="tests.reward_plugins:mean_red", args={"scael": 1}), r"reward 'mean_red': rewards\[\].args do not fit"),
        (RewardEntry(fn="tests.reward_plugins:NeverBuilds"), "reward 'NeverBuilds' could not be built: FileNotFoundError"),
        (RewardEntry(fn="tests.reward_plugins:NotCallable"), r"NotCallable instances are not callable; define __call__"),
        (RewardEntry(), "needs 'name'"),
    ],
)
def test_construction_errors_are_one_line_config_errors(plugin_path, entry, message):
    with pytest.raises(RewardConfigError, match=message) as info:
        build_reward(entry)
    assert "\n" not in str(info.value)


def test_entry_point_plugins(tmp_path, monkeypatch, plugin_path):
    dist = tmp_path / "tandem_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tandem-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[tandem.rewards]\nplugin_red = tests.reward_plugins:mean_red\nplugin_broken = no_such_plugin_module:fn\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    listed = dict(list_rewards())
    assert listed["plugin_red"] == "Mean red channel in [0, 1], times args.scale."
    assert listed["plugin_broken"].startswith("(broken plugin:")
    reward = build_reward(RewardEntry(name="plugin_red", args={"scale": 4.0}))
    assert reward.name == "plugin_red"
    np.testing.assert_allclose(reward(np.full((1, 2, 2, 3), 255, np.uint8), ["x"], [{}]), [4.0])
    with pytest.raises(RewardConfigError, match="reward plugin 'plugin_broken' .* failed to load: ModuleNotFoundError"):
        build_reward(RewardEntry(name="plugin_broken"))


def test_check_entries_names_the_entry_without_building(plugin_path):
    check_entries([RewardEntry(name="ocr"), RewardEntry(fn="tests.reward_plugins:NeverBuilds")])  # found, not built
    with pytest.raises(RewardConfigError, match=r"rewards\[1\]: unknown reward 'nope'; registered: "):
        check_entries([RewardEntry(name="brightness"), RewardEntry(name="nope")])
    with pytest.raises(RewardConfigError, match=r"rewards\[0\] needs 'name'"):
        RewardClient([RewardEntry()])


def test_unique_labels():
    entries = [RewardEntry(name="ocr"), RewardEntry(name="ocr"), RewardEntry(name="ocr_2"), RewardEntry(fn="pkg.mod:Cls")]
    assert unique_labels(entries) == ["ocr", "ocr_2", "ocr_2_2", "Cls"]


def test_to_scores_contract():
    np.testing.assert_array_equal(to_scores([1, None, float("nan")], 3, "r")[0], [1.0, np.nan, np.nan])
    np.testing.assert_array_equal(to_scores(torch.tensor([0.5, 2.0]), 2, "r")[0], [0.5, 2.0])
    assert to_scores(np.array([1, 2]), 2, "r")[0].dtype == np.float64
    with pytest.raises(RewardError, match="reward 'r' returned 1 scores for a batch of 2"):
        to_scores([1.0], 2, "r")
    with pytest.raises(RewardError, match="reward 'r' must return a sequence of numbers or None"):
        to_scores("0.5", 1, "r")


def test_values_that_are_not_numbers_are_listed_never_converted():
    raw = [1, None, float("nan"), float("inf"), -np.inf, "0.5", "high", True, np.float32(2), torch.tensor(3.0), [4]]
    values, not_numbers = to_scores(raw, len(raw), "r")
    np.testing.assert_array_equal(values, [1, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, 1, 2, 3, np.nan])
    assert not_numbers == {3: "inf", 4: "-inf", 5: "'0.5'", 6: "'high'", 10: "[4]"}
    assert to_scores(torch.tensor([1.0, float("inf")]), 2, "r")[1] == {1: "inf"}
