"""flow_grpo's prompt files load as they are, and each configs/flow_grpo/*.yaml validates with its rewards
found: OCR targets from the quoted text (ocr/*.txt), GenEval metadata reaching the reward (geneval/*.jsonl),
plain prompt lines (pickscore/*.txt)."""

import json

import pytest

from tandem.core.data import load_prompts
from tandem.rewards.base import RewardConfigError
from tandem.rewards.geneval import geneval_questions
from tandem.rewards.ocr import target_text
from tandem.rl.config import load_config
from tandem.rl.session import check_rewards

OCR_LINES = ['A vintage bakery sign that reads "Fresh Bread Daily"', 'A neon sign reading "OPEN 24 HOURS" above a diner']
GENEVAL_LINES = [
    {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}], "prompt": "a photo of two clocks"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "pink"}], "prompt": "a photo of a pink car"},
]
PICKSCORE_LINES = ["a majestic lion in a field of sunflowers, oil painting", "a cyberpunk city at night, rain"]


def write(folder, name, lines):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
    return path


@pytest.fixture
def flow_grpo_dataset(tmp_path):
    """The three prompt-file layouts of flow_grpo's dataset/ folder, a few lines each."""
    return {"ocr": write(tmp_path, "ocr/test.txt", OCR_LINES),
            "geneval": write(tmp_path, "geneval/test_metadata.jsonl", GENEVAL_LINES),
            "pickscore": write(tmp_path, "pickscore/test.txt", PICKSCORE_LINES)}


def test_flow_grpo_prompt_files_load(flow_grpo_dataset):
    ocr = load_prompts(str(flow_grpo_dataset["ocr"]))
    assert [target_text(r.prompt, r.metadata) for r in ocr] == ["Fresh Bread Daily", "OPEN 24 HOURS"]
    geneval = load_prompts(str(flow_grpo_dataset["geneval"]))
    assert geneval[0].prompt == "a photo of two clocks" and geneval[0].metadata["tag"] == "counting"
    assert geneval_questions(geneval[1].metadata) == [("Is there a car in the image?", True), ("Is the car pink?", True)]
    assert [r.prompt for r in load_prompts(str(flow_grpo_dataset["pickscore"]))] == PICKSCORE_LINES


@pytest.mark.parametrize("task, reward", [("ocr", "ocr"), ("geneval", "vlm"), ("pickscore", "pickscore")])
def test_flow_grpo_configs_validate_and_find_their_rewards(task, reward, flow_grpo_dataset, tmp_path):
    prompts = str(flow_grpo_dataset[task])
    cfg = load_config(f"configs/flow_grpo/{task}.yaml", [f"data.prompts={prompts}", f"data.eval_prompts={prompts}"], stage="decoder")
    assert [r.name for r in cfg.rewards] == [reward]
    args = cfg.rewards[0].args
    path_args = [k for k in ("model_path", "processor_path") if k in args]
    if path_args:  # the release weights are not here: the check names the missing folder ...
        with pytest.raises(RewardConfigError, match=f"rewards\\[0\\]: reward '{reward}' needs args.{path_args[0]}"):
            check_rewards(cfg)
        for key in path_args:  # ... and passes once the folders exist
            args[key] = str(tmp_path)
    check_rewards(cfg)
