import json

import pytest

from qscorer_reward import QScorerConfig


def test_round_trip_through_json(tmp_path):
    config = QScorerConfig(
        backbone_family="qwen2_5_vl",
        base_model="some/base",
        num_score_tokens=5,
        score_token_ids=[10, 11, 12, 13, 14],
        head_hidden_sizes=[32, 16],
        min_pixels=1024,
        max_pixels=200704,
        model_name="demo",
    )
    path = tmp_path / "qscorer_config.json"
    config.to_json_file(path)
    assert QScorerConfig.from_json_file(path) == config
    assert json.loads(path.read_text())["score_range"] == [1.0, 5.0]


def test_score_tokens_and_factor():
    config = QScorerConfig(backbone_family="qwen2_vl", num_score_tokens=3, patch_size=16, merge_size=2)
    assert config.score_tokens == ["<score1>", "<score2>", "<score3>"]
    assert config.resize_factor == 32


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_score_tokens": 0}, "num_score_tokens"),
        ({"prompt_template": "no placeholder"}, "{image}"),
        ({"score_range": (5, 1)}, "score_range"),
        ({"min_pixels": 10, "max_pixels": 5}, "min_pixels"),
        ({"weights_format": "pickle"}, "weights_format"),
        ({"version": 99}, "newer"),
    ],
)
def test_invalid_values_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        QScorerConfig(backbone_family="qwen2_vl", **overrides)


def test_bad_files_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="qscorer_config.json"):
        QScorerConfig.from_json_file(tmp_path / "qscorer_config.json")
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        QScorerConfig.from_json_file(path)
    path.write_text(json.dumps({"backbone_family": "qwen2_vl", "colour": "red"}))
    with pytest.raises(ValueError, match="unknown QScorerConfig keys: \\['colour'\\]"):
        QScorerConfig.from_json_file(path)
    path.write_text(json.dumps({"num_score_tokens": 1}))
    with pytest.raises(ValueError, match="backbone_family"):
        QScorerConfig.from_json_file(path)


@pytest.mark.parametrize("max_pixels", [10**12, 0, -5, 1e12, 2.5, float("nan"), float("inf"), True, "448"])
def test_the_pixel_budget_is_bounded(max_pixels):
    """1e12 in a checkpoint's config tried to allocate 12 TB on the first call."""
    with pytest.raises(ValueError, match=r"max_pixels must be a whole number of pixels in \[1, 67108864\]"):
        QScorerConfig(backbone_family="qwen2_vl", max_pixels=max_pixels)
    config = QScorerConfig(backbone_family="qwen2_vl", max_pixels=200704.0)  # a whole number, as JSON may give it
    assert config.max_pixels == 200704 and isinstance(config.max_pixels, int)
