"""Write the bundled placeholder checkpoint: a tiny Qwen2.5-VL-architecture Q-Scorer with random
weights, so that the package scores images out of the box until a trained default model ships.

    python scripts/make_untrained_default_model.py
"""

from qscorer_reward.checkpoint import BUNDLED_DEFAULT, UNTRAINED_PLACEHOLDER
from qscorer_reward.testing import tiny_scorer

if __name__ == "__main__":
    scorer = tiny_scorer("qwen2_5_vl", num_score_tokens=1, seed=0, max_pixels=224 * 224)
    scorer.config.model_name = UNTRAINED_PLACEHOLDER
    scorer.save_pretrained(BUNDLED_DEFAULT)
    print(f"wrote {BUNDLED_DEFAULT}")
