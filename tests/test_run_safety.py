"""The joint schedule and the hand-off kept by checkpoints: the parts that need no training job. The jobs
themselves: tests/test_resume_buffer_joint.py."""

import numpy as np

from tandem.core.types import PromptRecord


# ------------------------------------------------------------------------------ joint schedule and hand-off
def test_joint_phase_is_a_function_of_the_global_step():
    from tandem.rl.config import JobConfig
    from tandem.rl.session import joint_phase

    cfg = JobConfig(max_steps=11)
    cfg.joint.ar_steps_per_phase, cfg.joint.decoder_steps_per_phase = 2, 4
    phases = [joint_phase(cfg, step) for step in range(11)]
    assert [p[0] for p in phases] == ["ar"] * 2 + ["decoder"] * 4 + ["ar"] * 2 + ["decoder"] * 3
    assert phases[0] == ("ar", 0, 2) and phases[2] == phases[5] == ("decoder", 2, 6)
    assert phases[10] == ("decoder", 8, 11)  # the last phase ends at max_steps


def test_hand_off_records_round_trip_exactly(tmp_path):
    from tandem.rl.buffer import load_records, save_records

    source = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    tokens = np.arange(12, dtype=np.int64).reshape(3, 4)
    records = [PromptRecord(f"p{i // 2}", {"text": "hi", "n": i, "weights": [0.5, None], "reference": source,
                                           "full_tokens": tokens[i % 3]}) for i in range(4)]
    back = load_records(save_records(tmp_path / "h.safetensors", records))
    assert [r.prompt for r in back] == [r.prompt for r in records]
    for a, b in zip(records, back):
        assert a.metadata.keys() == b.metadata.keys()
        for k, v in a.metadata.items():
            w = b.metadata[k]
            same = np.array_equal(v, w) and v.dtype == w.dtype if isinstance(v, np.ndarray) else v == w
            assert same, k
    assert back[0].metadata["reference"] is back[3].metadata["reference"]  # one copy of a shared source image


def test_a_prompt_sampler_state_keeps_its_seed():
    from tandem.rl.data import PromptSampler

    records = [PromptRecord(str(i), {}) for i in range(5)]
    a = PromptSampler(records, seed=7)
    a.next_batch(3)
    b = PromptSampler(records, seed=0)
    b.load_state_dict(a.state_dict())
    assert [r.prompt for r in b.next_batch(9)] == [r.prompt for r in a.next_batch(9)]
