"""TrainingConfig round trips, validation with clear messages, and the shipped recipe and launcher configs."""

import json
from pathlib import Path

import pytest
import yaml

from qscorer_reward.training.config import DatasetConfig, LoraSettings, ParameterGroup, TrainingConfig

CONFIGS = Path(__file__).parent.parent / "training" / "configs"


def _config(**overrides):
    settings = dict(
        base_model="some/model",
        output_dir="out",
        train_datasets=[DatasetConfig(name="a", path="a.csv"), DatasetConfig(name="b", path="/r", format="spaq")],
        eval_datasets=[DatasetConfig(name="a-test", path="t.csv", mos_range=(0, 100))],
        lora=LoraSettings(r=4, alpha=8, target_modules="model\\.visual\\..*qkv"),
    )
    return TrainingConfig(**(settings | overrides))


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip(tmp_path, suffix):
    config = _config(head_hidden_sizes=[32, 16], report_to=["tensorboard"])
    config.save(tmp_path / f"config{suffix}")
    loaded = TrainingConfig.from_file(tmp_path / f"config{suffix}")
    assert loaded == config
    assert loaded.eval_datasets[0].mos_range == (0.0, 100.0)
    assert isinstance(loaded.lora, LoraSettings) and loaded.lora.target_modules == "model\\.visual\\..*qkv"


def test_defaults_are_the_released_recipe():
    config = TrainingConfig(base_model="m", output_dir="o", train_datasets=[DatasetConfig(name="a", path="a.csv")])
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (128, 256, 0.05)
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert (config.loss.mse, config.loss.ce) == (1.0, 0.05)
    assert (config.learning_rate, config.num_epochs, config.per_device_batch_size) == (2e-5, 3.0, 16)
    assert (config.lr_scheduler, config.warmup_ratio, config.weight_decay) == ("cosine", 0.03, 0.0)
    assert config.max_pixels == 448 * 448 and config.gradient_checkpointing


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train_datasets": []}, "at least one dataset"),
        ({"dtype": "float8"}, "dtype must be one of"),
        ({"metric_for_best": "accuracy"}, "metric_for_best must be one of"),
        ({"best_dataset": "nope"}, "best_dataset 'nope' is not among the eval_datasets"),
        ({"answer_text": "Score:"}, "must end with answer_text"),
        ({"per_device_batch_size": 0}, "per_device_batch_size must be >= 1"),
        ({"warmup_ratio": 1.5}, "warmup_ratio"),
        ({"train_datasets": [DatasetConfig(name="a", path="x"), DatasetConfig(name="a", path="y")]}, "repeated"),
        ({"train_datasets": [DatasetConfig(name="a", path="x", weight=2.0), DatasetConfig(name="b", path="y")]},
         "weight to every training dataset or to none"),
        ({"train_language_model": True}, "set lora to null"),
        ({"train_datasets": [DatasetConfig(name="s", path="x", group_size=4)], "per_device_batch_size": 6},
         "multiple of the training datasets' group_size 4"),
        ({"train_datasets": [DatasetConfig(name="s", path="x", group_size=4), DatasetConfig(name="m", path="y")]},
         "cannot be mixed"),
        ({"parameter_groups": [ParameterGroup("a", ["*"]), ParameterGroup("a", start_step=5)]}, "must be unique"),
        ({"parameter_groups": [ParameterGroup("a"), ParameterGroup("b", start_step=5)]}, "at most one"),
        ({"parameter_groups": [ParameterGroup("a", ["x.*"], start_step=5)]}, "must start at step 0"),
        ({"parameter_groups": [ParameterGroup("a", ["x.*"]), ParameterGroup("b", start_step=100)], "max_steps": 100},
         "start_step 100 must be < max_steps 100"),
    ],
)  # fmt: skip
def test_invalid_settings_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        _config(**change)


def test_parameter_groups_round_trip_and_refuse_a_negative_start():
    groups = [ParameterGroup("head", ["scorer.head.*", "score_token_rows.*"]), ParameterGroup("rest", start_step=50)]
    config = _config(parameter_groups=groups)
    assert TrainingConfig.from_dict(config.to_dict()).parameter_groups == groups
    with pytest.raises(ValueError, match="start_step must be >= 0"):
        ParameterGroup("late", start_step=-1)


def test_overrides_replace_file_values_and_reach_nested_settings(tmp_path):
    _config().save(tmp_path / "config.yaml")
    config = TrainingConfig.from_file(tmp_path / "config.yaml", {"max_steps": 7, "loss.mse": 0.5, "lora.r": 2})
    assert (config.max_steps, config.loss.mse, config.lora.r) == (7, 0.5, 2)
    with pytest.raises(ValueError, match=r"config.yaml: unknown setting\(s\) \['loss.msee'\]"):
        TrainingConfig.from_file(tmp_path / "config.yaml", {"loss.msee": 0.5})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"format": "imagenet"}, "format must be one of"),
        ({"mos_range": [5, 1]}, "mos_range must be"),
        ({"format": "koniq10k", "mos_range": [1, 5]}, "official readers know theirs"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"group_size": 0}, "group_size must be >= 1"),
    ],
)
def test_invalid_dataset_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        DatasetConfig(name="d", path="p", **settings)


def test_unknown_keys_are_named_with_their_place(tmp_path):
    data = _config().to_dict()
    data["train_datasets"][1]["wieght"] = 2
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"config.yaml: unknown setting\(s\) \['train_datasets\[1\].wieght'\]"):
        TrainingConfig.from_file(path)
    data = _config().to_dict() | {"lora": {"rank": 8}}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"\['lora.rank'\]"):
        TrainingConfig.from_file(path)


def test_unparsable_and_incomplete_files_are_named(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("base_model: [unclosed\n")
    with pytest.raises(ValueError, match="config.yaml: cannot parse"):
        TrainingConfig.from_file(path)
    path.write_text("base_model: m\n")
    with pytest.raises(ValueError, match="missing .* required .*output_dir"):
        TrainingConfig.from_file(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        TrainingConfig.from_file(tmp_path / "absent.yaml")


@pytest.mark.parametrize("name", ["qwen2_5_vl_7b_koniq.yaml", "qwen2_5_vl_7b_mixed.yaml"])
def test_shipped_recipes_load(name):
    config = TrainingConfig.from_file(CONFIGS / name)
    assert config.base_model == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert config.num_score_tokens == 5 and config.lora.r == 128 and config.train_vision_tower
    assert config.mixed_precision == "bf16" and config.dtype == "bfloat16"


def test_mixed_recipe_trains_on_three_datasets_with_held_out_splits():
    config = TrainingConfig.from_file(CONFIGS / "qwen2_5_vl_7b_mixed.yaml")
    assert [d.format for d in config.train_datasets] == ["koniq10k", "spaq", "kadid10k"]
    held_out = {(d.format, d.test_fraction, d.split_seed) for d in config.eval_datasets if d.test_fraction}
    trained = {(d.format, d.test_fraction, d.split_seed) for d in config.train_datasets if d.test_fraction}
    assert held_out == trained  # the same random split on both sides


@pytest.mark.parametrize(
    ("name", "kind"), [("ddp.yaml", "MULTI_GPU"), ("fsdp.yaml", "FSDP"), ("deepspeed_zero2.yaml", "DEEPSPEED")]
)
def test_launcher_configs_are_valid_accelerate_configs(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(CONFIGS / "accelerate" / name)
    assert str(config.distributed_type).endswith(kind)
    assert config.mixed_precision == "bf16"
    if kind == "DEEPSPEED":
        ds_file = Path(config.deepspeed_config["deepspeed_config_file"])
        settings = json.loads((CONFIGS.parent.parent / ds_file).read_text())
        assert settings["zero_optimization"]["stage"] == 2
