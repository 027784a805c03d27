"""tandem: rewards — what judges the images.

    from tandem.rewards import register, RewardClient

    @register("my_reward")                       # or reference it as "my_pkg.my_module:my_reward"
    def my_reward(images, prompts, metadata):    # uint8 (B, H, W, 3) RGB, B prompts, B dicts
        return [...]                             # B floats; None = no score

Built-ins: ocr, hands, aesthetic, vlm, lpips, jpeg_compressibility, brightness, color (``tandem rewards``).
"""

from tandem.rewards.base import RewardConfigError, RewardError, build_reward, list_rewards, register
from tandem.rewards.client import RewardClient, RewardScores, ScoreFuture

__all__ = ["RewardClient", "RewardConfigError", "RewardError", "RewardScores", "ScoreFuture", "build_reward", "list_rewards", "register"]
