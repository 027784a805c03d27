"""Hand realism from mediapipe Hands (0.10.21; palm and 21-landmark models ship inside its wheel).

For each detected hand h, on its 3-D world landmarks (metres; MediaPipe's 21-point layout, 0 = wrist):

    hand_h = confidence_h * lengths_h * angles_h * apart_h

* confidence: mediapipe's score for the hand (its handedness classifier score, in [0.5, 1]; the Hands
  solution exposes no other per-hand score — detection itself is gated by ``min_detection_confidence``).
* lengths: mean over the 19 bones b (palm rays and phalanges) of exp(-(ln(l_b / (rho_b P)))^2 / (2 sigma^2)),
  with P = |wrist - middle MCP| the palm length, rho_b the bone-to-palm ratios of an adult hand
  (``REFERENCE_RATIOS``) and sigma = ln 1.5 (a bone 1.5x too long or short scores 0.61, 2x scores 0.23).
* angles: share of the 14 finger joints (4 x MCP/PIP/DIP, thumb MCP/IP) whose bend angle — the angle between
  the two bones meeting there, 0 = straight — is within its anatomical limit (``JOINT_LIMITS_DEG``).
* apart: share of the 10 pairs of fingers that stay at least 0.1 P apart (each finger's bones sampled at
  8 points per bone): fingers do not pass through each other.

Image score = the minimum over its hands (one bad hand spoils the image, and adding a good hand does not
hide it). An image where no hand is found scores ``no_hand_score`` (default None: no score).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from tandem.rewards.base import RewardConfigError, register

# Landmarks of each finger from its base (thumb CMC, finger MCPs) to its tip; the wrist is landmark 0.
FINGERS: Dict[str, Tuple[int, ...]] = {
    "thumb": (1, 2, 3, 4),
    "index": (5, 6, 7, 8),
    "middle": (9, 10, 11, 12),
    "ring": (13, 14, 15, 16),
    "pinky": (17, 18, 19, 20),
}
# Bone (a, b) length / palm length |0-9|, adult hand (metacarpal and phalanx proportions).
REFERENCE_RATIOS: Dict[Tuple[int, int], float] = {
    (0, 1): 0.40, (1, 2): 0.45, (2, 3): 0.38, (3, 4): 0.33,
    (0, 5): 0.95, (5, 6): 0.48, (6, 7): 0.28, (7, 8): 0.24,
    (9, 10): 0.53, (10, 11): 0.33, (11, 12): 0.26,
    (0, 13): 0.92, (13, 14): 0.50, (14, 15): 0.31, (15, 16): 0.25,
    (0, 17): 0.85, (17, 18): 0.38, (18, 19): 0.22, (19, 20): 0.22,
}
LENGTH_SIGMA = float(np.log(1.5))
# Joint landmark -> largest anatomical bend (degrees) between its two bones.
JOINT_LIMITS_DEG: Dict[int, float] = {
    2: 80.0, 3: 100.0,  # thumb MCP, IP
    5: 100.0, 9: 100.0, 13: 100.0, 17: 100.0,  # MCP (flexion ~90, hyperextension ~30-45)
    6: 120.0, 10: 120.0, 14: 120.0, 18: 120.0,  # PIP (~110)
    7: 100.0, 11: 100.0, 15: 100.0, 19: 100.0,  # DIP (~90)
}
MIN_FINGER_GAP = 0.1  # x palm length
SAMPLES_PER_BONE = 8


def _palm_length(points: np.ndarray) -> float:
    return float(np.linalg.norm(points[9] - points[0]))


def length_score(points: np.ndarray) -> float:
    """Mean log-normal closeness of each bone's length to its reference share of the palm length."""
    palm = _palm_length(points)
    ratios = np.array([np.linalg.norm(points[b] - points[a]) / palm for a, b in REFERENCE_RATIOS])
    reference = np.array(list(REFERENCE_RATIOS.values()))
    log_err = np.log(np.maximum(ratios, 1e-6) / reference)
    return float(np.exp(-(log_err**2) / (2 * LENGTH_SIGMA**2)).mean())


def joint_angles_deg(points: np.ndarray) -> Dict[int, float]:
    """Bend angle (degrees, 0 = straight) at every joint of JOINT_LIMITS_DEG."""
    out = {}
    for finger in FINGERS.values():
        chain = (0,) + finger
        for prev, joint, nxt in zip(chain, chain[1:], chain[2:]):
            if joint in JOINT_LIMITS_DEG:
                u, v = points[joint] - points[prev], points[nxt] - points[joint]
                cos = np.dot(u, v) / max(np.linalg.norm(u) * np.linalg.norm(v), 1e-12)
                out[joint] = float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))
    return out


def angle_score(points: np.ndarray) -> float:
    """Share of joints bent no further than their anatomical limit."""
    angles = joint_angles_deg(points)
    return float(np.mean([angles[j] <= limit for j, limit in JOINT_LIMITS_DEG.items()]))


def _finger_samples(points: np.ndarray, finger: Tuple[int, ...]) -> np.ndarray:
    t = np.linspace(0.0, 1.0, SAMPLES_PER_BONE)[:, None]
    return np.concatenate([points[a] + t * (points[b] - points[a]) for a, b in zip(finger, finger[1:])])


def apart_score(points: np.ndarray) -> float:
    """Share of finger pairs whose closest sampled points are at least MIN_FINGER_GAP palm lengths apart."""
    samples = [_finger_samples(points, finger) for finger in FINGERS.values()]
    gap = MIN_FINGER_GAP * _palm_length(points)
    ok = []
    for i in range(len(samples)):
        for j in range(i + 1, len(samples)):
            d = np.linalg.norm(samples[i][:, None, :] - samples[j][None, :, :], axis=-1)
            ok.append(d.min() >= gap)
    return float(np.mean(ok))


def plausibility(points: np.ndarray) -> float:
    """lengths * angles * apart for one hand's (21, 3) world landmarks, in [0, 1]."""
    points = np.asarray(points, dtype=np.float64)
    if _palm_length(points) <= 0:
        return 0.0
    return length_score(points) * angle_score(points) * apart_score(points)


@register("hands")
class HandsReward:
    """Hand realism: mediapipe Hands confidence x landmark plausibility (bone lengths, joint limits, no crossing)."""

    def __init__(self, no_hand_score: Optional[float] = None, max_num_hands: int = 4, min_detection_confidence: float = 0.5, model_complexity: int = 1):
        if model_complexity not in (0, 1):
            raise RewardConfigError(f"reward 'hands': args.model_complexity is {model_complexity!r}; allowed: 0, 1")
        import mediapipe as mp

        self.no_hand_score = no_hand_score
        self.hands = mp.solutions.hands.Hands(
            static_image_mode=True,
            max_num_hands=max_num_hands,
            model_complexity=model_complexity,
            min_detection_confidence=min_detection_confidence,
        )

    def detect(self, image: np.ndarray) -> List[Tuple[float, np.ndarray]]:
        """(confidence, world landmarks (21, 3)) of each hand found in an RGB uint8 image."""
        result = self.hands.process(np.ascontiguousarray(image))
        if not result.multi_hand_world_landmarks:
            return []
        return [
            (float(handedness.classification[0].score), np.array([[p.x, p.y, p.z] for p in world.landmark]))
            for handedness, world in zip(result.multi_handedness, result.multi_hand_world_landmarks)
        ]

    def __call__(self, images: np.ndarray, prompts: List[str], metadata: List[dict]) -> List[Optional[float]]:
        out: List[Optional[float]] = []
        for image in images:
            hands = self.detect(image)
            out.append(min(conf * plausibility(pts) for conf, pts in hands) if hands else self.no_hand_score)
        return out
