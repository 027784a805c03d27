"""Hands reward: the plausibility math on constructed landmarks, and mediapipe end to end offline."""

import math
import socket

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from tandem.rewards.base import RewardConfigError
from tandem.rewards.hands import FINGERS, REFERENCE_RATIOS, HandsReward, angle_score, apart_score, length_score, plausibility

PALM = 0.09  # metres, wrist to middle MCP


def canonical_hand() -> np.ndarray:
    """(21, 3) world landmarks of a flat open hand with exactly the reference bone ratios."""
    pts = np.zeros((21, 3))
    rays = {1: -40.0, 5: -12.0, 9: 0.0, 13: 11.0, 17: 22.0}  # degrees from the wrist->middle-MCP axis
    directions = {1: -45.0, 5: -12.0, 9: 0.0, 13: 11.0, 17: 22.0}
    ratio = dict(REFERENCE_RATIOS)
    ratio[(0, 9)] = 1.0
    for finger in FINGERS.values():
        base = finger[0]
        a = math.radians(rays[base])
        pts[base] = PALM * ratio[(0, base)] * np.array([math.sin(a), math.cos(a), 0.0])
        d = math.radians(directions[base])
        step = np.array([math.sin(d), math.cos(d), 0.0])
        for prev, cur in zip(finger, finger[1:]):
            pts[cur] = pts[prev] + PALM * ratio[(prev, cur)] * step
    return pts


def rotate_after(pts: np.ndarray, joint: int, tail: list, degrees: float) -> np.ndarray:
    """Bend the landmarks ``tail`` about ``joint`` by ``degrees`` in the x-z plane (out of the palm)."""
    out = pts.copy()
    a = math.radians(degrees)
    rot = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    for k in tail:
        out[k] = pts[joint] + rot @ (pts[k] - pts[joint])
    return out


def test_canonical_hand_is_fully_plausible():
    pts = canonical_hand()
    assert length_score(pts) == pytest.approx(1.0)
    assert angle_score(pts) == 1.0
    assert apart_score(pts) == 1.0
    assert plausibility(pts) == pytest.approx(1.0)
    assert plausibility(pts * 1.7) == pytest.approx(1.0)  # scale-free: ratios to the palm length


def test_wrong_bone_length_lowers_the_length_term():
    pts = canonical_hand()
    stretched = pts.copy()
    stretched[[7, 8]] += 2 * (pts[7] - pts[6])  # index middle phalanx 3x as long
    one_bone = math.exp(-(math.log(3.0) / math.log(1.5)) ** 2 / 2)
    assert length_score(stretched) == pytest.approx((18 + one_bone) / 19)
    assert plausibility(stretched) < 0.96


def test_joint_past_its_limit_lowers_the_angle_term():
    pts = canonical_hand()
    assert angle_score(rotate_after(pts, 6, [7, 8], 90.0)) == 1.0  # PIP flexed 90 degrees: fine
    assert angle_score(rotate_after(pts, 6, [7, 8], 150.0)) == pytest.approx(13 / 14)  # folded back on itself


def test_fingers_through_each_other_lower_the_apart_term():
    pts = canonical_hand()
    crossed = pts.copy()
    crossed[[10, 11, 12]] = pts[[6, 7, 8]] + np.array([0.0, 0.0, 0.002])  # middle finger inside the index finger
    assert apart_score(crossed) == pytest.approx(9 / 10)
    assert plausibility(crossed) < plausibility(pts)


def drawn_hand() -> np.ndarray:
    """A flat cartoon hand (palm, four fingers, thumb, wrist) that mediapipe's palm detector finds."""
    size, skin = 512, (190, 130, 100)
    im = Image.new("RGB", (size, size), (240, 240, 240))
    d = ImageDraw.Draw(im)
    cx, cy, pw, ph = size / 2, size * 0.62, 165, 180
    d.rounded_rectangle([cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2], radius=52, fill=skin)
    for k, (x, length) in enumerate(zip([-0.36, -0.12, 0.12, 0.36], [0.75, 0.85, 0.8, 0.62])):
        angle = math.radians((k - 1.5) * 5)
        x0, y0, reach = cx + x * pw, cy - ph / 2 + 15, length * ph * 1.2
        x1, y1 = x0 + reach * math.sin(angle), y0 - reach * math.cos(angle)
        d.line([(x0, y0), (x1, y1)], fill=skin, width=39)
        d.ellipse([x1 - 19, y1 - 19, x1 + 19, y1 + 19], fill=skin)
    x0, y0 = cx - pw / 2 + 15, cy + ph * 0.15
    d.line([(x0, y0), (x0 - 105, y0 - 105)], fill=skin, width=45)
    d.ellipse([x0 - 127, y0 - 127, x0 - 83, y0 - 83], fill=skin)
    d.rectangle([cx - pw * 0.35, cy + ph / 2 - 5, cx + pw * 0.35, size], fill=skin)
    return np.asarray(im.filter(ImageFilter.GaussianBlur(2)))


@pytest.fixture(scope="module")
def hands():
    return HandsReward()


def test_mediapipe_runs_offline_no_hand_is_none(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the hands reward tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    reward = HandsReward()
    blank = np.full((2, 256, 256, 3), 128, np.uint8)
    assert reward(blank, ["a hand", "a hand"], [{}, {}]) == [None, None]
    assert HandsReward(no_hand_score=0.0)(blank[:1], ["a hand"], [{}]) == [0.0]


def drawn_hand_variants() -> np.ndarray:
    """The cartoon hand shifted and rescaled 15 ways: the detector is sensitive to a few pixels, so the test
    asks for detections among the variants rather than on one exact drawing."""
    base = Image.fromarray(drawn_hand())
    out = []
    for scale in (0.9, 1.0, 1.1):
        side = int(512 * scale)
        im = base.resize((side, side), Image.BICUBIC)
        canvas = Image.new("RGB", (512, 512), (240, 240, 240))
        canvas.paste(im, ((512 - side) // 2, (512 - side) // 2))
        for dx in (-8, -4, 0, 4, 8):
            out.append(np.roll(np.asarray(canvas), dx, axis=1))
    return np.stack(out)


def test_drawn_hands_are_found_and_scored(hands):
    images = drawn_hand_variants()
    scores = hands(images, ["a hand"] * len(images), [{}] * len(images))
    found = [(i, hands.detect(images[i])) for i in range(len(images))]
    found = [(i, f) for i, f in found if f]
    assert len(found) >= 3, f"mediapipe found a hand in only {len(found)} of {len(images)} drawings"
    for i, hands_in_image in found:
        expected = min(conf * plausibility(world) for conf, world in hands_in_image)
        assert all(0.5 <= conf <= 1.0 and world.shape == (21, 3) for conf, world in hands_in_image)
        assert scores[i] == pytest.approx(expected) and 0.0 < scores[i] <= 1.0
    assert sum(s is None for s in scores) == len(images) - len(found)


def test_bad_args():
    with pytest.raises(RewardConfigError, match="args.model_complexity"):
        HandsReward(model_complexity=3)
