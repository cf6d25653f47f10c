"""Checkpoint round trips in both forms, and precise errors for broken checkpoint directories."""

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file

from qscorer_reward import QScorer
from qscorer_reward.preprocessing import to_unit_pixels
from qscorer_reward.testing import tiny_base_model, tiny_scorer

_generator = torch.Generator().manual_seed(0)
IMAGES = [torch.rand(3, 56, 70, generator=_generator), torch.rand(3, 90, 50, generator=_generator)]


@pytest.mark.parametrize("num_score_tokens", [1, 5])
def test_full_checkpoint_round_trip_gives_identical_scores(tmp_path, family, num_score_tokens):
    scorer = tiny_scorer(family, num_score_tokens=num_score_tokens)
    scorer.save_pretrained(tmp_path / "checkpoint")
    files = {p.name for p in (tmp_path / "checkpoint").iterdir()}
    assert {"qscorer_config.json", "head.safetensors", "model.safetensors", "config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    loaded = QScorer.from_pretrained(tmp_path / "checkpoint")
    assert torch.equal(loaded(IMAGES), scorer(IMAGES))
    assert loaded.config == scorer.config
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not list(tmp_path.glob(".*partial*"))


def _trained_scorer(base_model_dir):
    """A scorer on a base model directory with everything training changes perturbed: LoRA on the
    attention projections, the score-token rows and the head."""
    scorer = QScorer.from_base_model(base_model_dir, num_score_tokens=5, max_pixels=112 * 112)
    assert scorer.config.base_model == str(base_model_dir)
    generator = torch.Generator().manual_seed(3)
    model = scorer.backbone.model
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    inject_adapter_in_model(lora, model)
    with torch.no_grad():
        ids = scorer.config.score_token_ids
        model.get_input_embeddings().weight[ids] += torch.randn(5, 64, generator=generator)
        model.get_output_embeddings().weight[ids] += torch.randn(5, 64, generator=generator)
        for param in scorer.head.parameters():
            param += 0.1 * torch.randn(param.shape, generator=generator)
        scorer.head.mlp[-1].weight *= 0.2  # scores inside the range, where differences show
    return scorer.eval()


def _raw_scores(scorer, images) -> torch.Tensor:
    """The head's unbounded output: two models cannot agree on it by both saturating."""
    inputs = scorer.backbone.prepare(to_unit_pixels(images))
    hidden = scorer.backbone(inputs)
    return scorer.head.raw_score(hidden[torch.arange(len(images)), inputs.score_positions])


def test_trained_parts_round_trip(base_model_dir, tmp_path):
    scorer = _trained_scorer(base_model_dir)
    expected = scorer(IMAGES)
    assert ((expected > 1.2) & (expected < 4.8)).all(), expected  # a round trip shows in these scores
    untouched = QScorer.from_base_model(base_model_dir, num_score_tokens=5, max_pixels=112 * 112)
    with torch.no_grad():
        assert not torch.allclose(_raw_scores(untouched, IMAGES), _raw_scores(scorer, IMAGES), atol=1e-3)

    scorer.save_pretrained(tmp_path / "parts", weights_format="trained_parts")
    files = {p.name for p in (tmp_path / "parts").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "score_tokens.safetensors", "head.safetensors"} <= files
    assert "model.safetensors" not in files
    assert json.loads((tmp_path / "parts" / "qscorer_config.json").read_text())["weights_format"] == "trained_parts"

    unmerged = QScorer.from_pretrained(tmp_path / "parts", merge_lora=False)
    assert torch.equal(unmerged(IMAGES), expected)
    merged = QScorer.from_pretrained(tmp_path / "parts")
    assert torch.allclose(merged(IMAGES), expected, atol=1e-5)
    assert not any(p.requires_grad for p in merged.parameters())
    # the merged adapter cannot be saved apart again, only as a whole model
    with pytest.raises(ValueError, match="merged into the base weights"):
        merged.save_pretrained(tmp_path / "again", weights_format="trained_parts")
    merged.save_pretrained(tmp_path / "whole", weights_format="full")
    assert torch.allclose(QScorer.from_pretrained(tmp_path / "whole")(IMAGES), expected, atol=1e-5)
    unmerged.save_pretrained(tmp_path / "again", weights_format="trained_parts")
    assert torch.equal(QScorer.from_pretrained(tmp_path / "again", merge_lora=False)(IMAGES), expected)


def test_trained_parts_without_lora(base_model_dir, tmp_path):
    scorer = QScorer.from_base_model(base_model_dir, num_score_tokens=1, max_pixels=112 * 112)
    scorer.save_pretrained(tmp_path / "parts", weights_format="trained_parts")
    assert not (tmp_path / "parts" / "adapter_config.json").exists()
    assert torch.equal(QScorer.from_pretrained(tmp_path / "parts")(IMAGES), scorer(IMAGES))


def test_full_form_refuses_an_unmerged_adapter(base_model_dir, tmp_path):
    with pytest.raises(ValueError, match="LoRA adapter"):
        _trained_scorer(base_model_dir).save_pretrained(tmp_path / "full", weights_format="full")


def test_trained_parts_need_a_base_model(tmp_path):
    with pytest.raises(ValueError, match="base_model"):
        tiny_scorer().save_pretrained(tmp_path / "parts", weights_format="trained_parts")


def test_load_in_bfloat16_on_request(tmp_path):
    tiny_scorer().save_pretrained(tmp_path / "checkpoint")
    loaded = QScorer.from_pretrained(tmp_path / "checkpoint", dtype=torch.bfloat16, device="cpu")
    assert loaded.dtype == torch.bfloat16
    assert loaded(IMAGES).dtype == torch.float32


def test_saving_over_a_checkpoint_is_atomic(tmp_path, monkeypatch):
    first, second = tiny_scorer(seed=0), tiny_scorer(seed=1)
    target = tmp_path / "checkpoint"
    first.save_pretrained(target)
    import qscorer_reward.checkpoint as checkpoint

    def failing_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        second.save_pretrained(target)
    monkeypatch.undo()
    assert torch.equal(QScorer.from_pretrained(target)(IMAGES), first(IMAGES))  # the old one intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no leftovers
    second.save_pretrained(target)
    assert torch.equal(QScorer.from_pretrained(target)(IMAGES), second(IMAGES))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


# ---------------------------------------------------------------- broken checkpoints


@pytest.fixture
def checkpoint_dir(tmp_path):
    directory = tmp_path / "checkpoint"
    tiny_scorer().save_pretrained(directory)
    return directory


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_missing_config_is_named(checkpoint_dir):
    (checkpoint_dir / "qscorer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="qscorer_config.json not found"):
        QScorer.from_pretrained(checkpoint_dir)


def test_missing_head_is_named(checkpoint_dir):
    (checkpoint_dir / "head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="head.safetensors not found.*score head"):
        QScorer.from_pretrained(checkpoint_dir)


def test_truncated_head_is_named(checkpoint_dir):
    _truncate(checkpoint_dir / "head.safetensors")
    with pytest.raises(ValueError, match="head.safetensors.*truncated"):
        QScorer.from_pretrained(checkpoint_dir)


def test_wrong_head_shape_is_named(checkpoint_dir):
    path = checkpoint_dir / "head.safetensors"
    tensors = load_file(path)
    tensors["mlp.0.weight"] = torch.zeros(32, 48)
    save_file(tensors, path)
    with pytest.raises(ValueError, match="head.safetensors: tensor 'mlp.0.weight' has shape \\(32, 48\\), expected"):
        QScorer.from_pretrained(checkpoint_dir)


def test_truncated_backbone_weights_are_named(checkpoint_dir):
    _truncate(checkpoint_dir / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors.*truncated"):
        QScorer.from_pretrained(checkpoint_dir)


def test_missing_backbone_weights_are_named(checkpoint_dir):
    (checkpoint_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no backbone weights"):
        QScorer.from_pretrained(checkpoint_dir)


def test_backbone_weights_of_the_wrong_shape_are_named(checkpoint_dir):
    path = checkpoint_dir / "model.safetensors"
    tensors = load_file(path)
    name = next(n for n in tensors if n.endswith("q_proj.weight"))
    tensors[name] = torch.zeros(8, 8)
    save_file(tensors, path, metadata={"format": "pt"})
    message = "model.safetensors: tensor '.*q_proj.weight' has shape \\(8, 8\\), expected \\(64, 64\\)"
    with pytest.raises(ValueError, match=message):
        QScorer.from_pretrained(checkpoint_dir)


def test_backbone_weights_with_missing_tensors_are_named(checkpoint_dir):
    path = checkpoint_dir / "model.safetensors"
    tensors = load_file(path)
    del tensors[next(n for n in tensors if n.endswith("q_proj.weight"))]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="backbone weights do not match.*missing_keys"):
        QScorer.from_pretrained(checkpoint_dir)


def test_broken_trained_parts_are_named(base_model_dir, tmp_path):
    directory = tmp_path / "parts"
    _trained_scorer(base_model_dir).save_pretrained(directory, weights_format="trained_parts")
    rows = directory / "score_tokens.safetensors"
    original = rows.read_bytes()
    save_file({"input_embeddings": torch.zeros(4, 64), "output_embeddings": torch.zeros(5, 64)}, rows)
    with pytest.raises(ValueError, match="score_tokens.safetensors: tensor 'input_embeddings' has shape \\(4, 64\\)"):
        QScorer.from_pretrained(directory)
    rows.unlink()
    with pytest.raises(FileNotFoundError, match="score_tokens.safetensors not found"):
        QScorer.from_pretrained(directory)
    rows.write_bytes(original)
    _truncate(directory / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="adapter_model.safetensors.*truncated"):
        QScorer.from_pretrained(directory)


def test_missing_base_model_is_named(base_model_dir, tmp_path):
    directory = tmp_path / "parts"
    _trained_scorer(base_model_dir).save_pretrained(directory, weights_format="trained_parts")
    config = json.loads((directory / "qscorer_config.json").read_text())
    config["base_model"] = str(tmp_path / "nowhere" / "base")
    (directory / "qscorer_config.json").write_text(json.dumps(config))
    with pytest.raises((OSError, ValueError), match="nowhere"):
        QScorer.from_pretrained(directory)


def test_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        QScorer.from_pretrained(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        QScorer.from_pretrained(tmp_path / "file")


def test_base_model_processor_config_sets_pixel_statistics(base_model_dir):
    (base_model_dir / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "min_pixels": 1024})
    )
    scorer = QScorer.from_base_model(base_model_dir)
    assert scorer.config.image_mean == (0.5, 0.5, 0.5) and scorer.config.image_std == (0.5, 0.5, 0.5)
    assert scorer.config.min_pixels == 1024
    assert scorer.config.max_pixels == 448 * 448
    assert scorer.config.patch_size == 14 and scorer.config.merge_size == 2


def test_adapter_file_is_in_peft_format(base_model_dir, tmp_path):
    """`peft.PeftModel.from_pretrained` finds every adapter tensor in the file we write."""
    import warnings

    from peft import PeftModel

    scorer = _trained_scorer(base_model_dir)
    scorer.save_pretrained(tmp_path / "parts", weights_format="trained_parts")
    model, _ = tiny_base_model("qwen2_5_vl", seed=7)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys.*")
        peft_model = PeftModel.from_pretrained(model, tmp_path / "parts")
    ours = {n: p for n, p in scorer.backbone.model.named_parameters() if "lora_" in n}
    theirs = {n.removeprefix("base_model.model."): p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)


def _with_base_model(base_model_dir, tmp_path, base_model: str):
    directory = tmp_path / "parts"
    QScorer.from_base_model(base_model_dir).save_pretrained(directory, weights_format="trained_parts")
    config = json.loads((directory / "qscorer_config.json").read_text())
    config["base_model"] = base_model
    (directory / "qscorer_config.json").write_text(json.dumps(config))
    return directory


def test_a_base_model_path_that_does_not_exist_is_named_as_a_path(base_model_dir, tmp_path):
    missing = str(tmp_path / "moved" / "base")
    directory = _with_base_model(base_model_dir, tmp_path, missing)
    with pytest.raises(FileNotFoundError, match=f"its base_model {missing} does not exist") as raised:
        QScorer.from_pretrained(directory)
    assert "Repo id" not in str(raised.value)


@pytest.mark.parametrize("offline", [True, False])
def test_a_base_model_the_hub_cannot_give_fails_at_once(base_model_dir, tmp_path, offline):
    """``runs/x`` (a typo of a local folder, shaped like a hub id): with downloads off, or the hub
    unreachable (here: an endpoint nothing listens on), the error comes at once and names it."""
    directory = _with_base_model(base_model_dir, tmp_path, "runs/x")
    code = (
        "import sys\nfrom qscorer_reward import QScorer\n"
        "try:\n    QScorer.from_pretrained(sys.argv[1])\nexcept FileNotFoundError as err:\n    print(err)\n"
    )
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-c", code, str(directory)], env=env, capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    message = result.stdout
    assert f"base_model 'runs/x': there is no such local folder ({tmp_path / 'runs' / 'x'})" in message
    reason = "downloads are off (HF_HUB_OFFLINE=1)" if offline else "the hub (http://127.0.0.1:9) cannot be reached"
    assert reason in message
