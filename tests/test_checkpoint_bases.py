"""What a trained-parts checkpoint names as its base, and pairwise training on top of either checkpoint
form: a saved checkpoint always loads back as the model that was saved (issue 21, items 17 and 18)."""

import tempfile
import warnings

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from tiny_checkpoints import pairs, pixels, trained_final, whole_weights

from qscorer_reward import QScorer
from qscorer_reward.training.pairwise import QScorerRewardConfig, QScorerRewardTrainer


@pytest.fixture(scope="module")
def final(tmp_path_factory):
    """A `qscorer train` final/ checkpoint: LoRA adapter, merger trained whole, rows, head."""
    return trained_final(tmp_path_factory.mktemp("train"))


def pairwise_args(output_dir):
    return QScorerRewardConfig(
        output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=0,
    )  # fmt: skip


def scores(scorer, images):
    with torch.no_grad():
        return scorer.eval()(images)


# ------------------------------------------------------------------------------ the base it names


@pytest.fixture
def system_temp(tmp_path, monkeypatch):
    """The system's temporary folder, moved into tmp_path so that a lasting place exists beside it."""
    temporary = tmp_path / "system-temp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    return temporary


def test_a_checkpoint_that_would_outlive_its_temporary_base_is_refused(base_model_dir, system_temp, tmp_path):
    """Item 17: the pairwise example built its base in a TemporaryDirectory and saved a checkpoint that
    named it; once the folder was gone the checkpoint could not load."""
    base = system_temp / "base"
    base_model_dir.rename(base)
    scorer = QScorer.from_base_model(base, max_pixels=56 * 56)
    with pytest.raises(ValueError, match="is in the temporary folder .* would outlive it: save the base model"):
        scorer.save_pretrained(tmp_path / "lasting", weights_format="trained_parts")
    assert not (tmp_path / "lasting").exists()
    scorer.save_pretrained(system_temp / "checkpoint", weights_format="trained_parts")  # as short-lived as its base

    # The pairwise trainer refuses before training, not at its first save.
    with pytest.raises(ValueError, match="is in the temporary folder"):
        QScorerRewardTrainer(
            model=scorer, args=pairwise_args(tmp_path / "run"), train_dataset=pairs(),
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        )  # fmt: skip


def test_score_token_training_on_a_temporary_base_is_refused_before_it_starts(base_model_dir, system_temp, tmp_path):
    from qscorer_reward.training import DatasetConfig, ScoreTokenTrainer, TrainingConfig

    base = system_temp / "base"
    base_model_dir.rename(base)
    config = TrainingConfig(
        base_model=str(base), output_dir=str(tmp_path / "run"), train_datasets=[DatasetConfig("d", "none.csv")]
    )
    with pytest.raises(ValueError, match="is in the temporary folder"):
        ScoreTokenTrainer(config).train()
    assert not (tmp_path / "run").exists()


def test_a_local_base_is_named_by_its_absolute_path(base_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(base_model_dir.parent)
    scorer = QScorer.from_base_model(base_model_dir.name, max_pixels=56 * 56)
    scorer.save_pretrained("checkpoint", weights_format="trained_parts")
    monkeypatch.chdir(tmp_path.parent)  # loads from any working directory
    loaded = QScorer.from_pretrained(base_model_dir.parent / "checkpoint")
    assert loaded.config.base_model == str(base_model_dir.resolve())
    torch.testing.assert_close(scores(loaded, pixels(2, 0)), scores(scorer, pixels(2, 0)))


def test_a_whole_weights_checkpoint_is_the_base_of_its_trained_parts(final, tmp_path):
    whole = whole_weights(final, tmp_path / "whole")
    scorer = QScorer.from_pretrained(whole, merge_lora=False)
    with torch.no_grad():
        scorer.head.mlp[0].bias += 0.5  # anything trained on top of the whole weights
    scorer.save_pretrained(tmp_path / "parts", weights_format="trained_parts")
    loaded = QScorer.from_pretrained(tmp_path / "parts")
    assert loaded.config.base_model == str(whole.resolve())
    torch.testing.assert_close(scores(loaded, pixels(3, 1)), scores(scorer, pixels(3, 1)))
    with pytest.raises(ValueError, match="would replace its own base model"):
        scorer.save_pretrained(whole, weights_format="trained_parts")
    assert QScorer.from_pretrained(whole).config.weights_format == "full"


def test_tensors_a_checkpoint_held_whole_are_saved_again(final, tmp_path):
    """A trained-parts save of a scorer loaded from trained parts keeps the modules trained whole
    (here the vision merger): without them it would score as the base's merger does."""
    scorer = QScorer.from_pretrained(final, merge_lora=False)
    assert scorer.trained_module_names and all("merger" in name for name in scorer.trained_module_names)
    scorer.save_pretrained(tmp_path / "again", weights_format="trained_parts")
    saved = load_file(tmp_path / "again" / "trained_modules.safetensors")
    assert saved.keys() == load_file(final / "trained_modules.safetensors").keys()
    torch.testing.assert_close(
        scores(QScorer.from_pretrained(tmp_path / "again"), pixels(3, 2)), scores(scorer, pixels(3, 2))
    )


# ---------------------------------------------------------------------- pairwise on either form


@pytest.mark.parametrize("form", ["trained_parts", "full"])
def test_the_documented_pairwise_setup_trains_on_both_checkpoint_forms(form, final, tmp_path):
    """Item 18: docs/trl.md loads with merge_lora=False and passes a LoraConfig; on the final/ of
    `qscorer train` (which carries an adapter) that raised "already carries a LoRA adapter"."""
    checkpoint = final if form == "trained_parts" else whole_weights(final, tmp_path / "whole")
    scorer = QScorer.from_pretrained(checkpoint, merge_lora=False)
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = QScorerRewardTrainer(
            model=scorer, args=pairwise_args(tmp_path / "run"), train_dataset=pairs(), peft_config=peft_config
        )
    differs = [str(w.message) for w in caught if "already carries a LoRA adapter" in str(w.message)]
    if form == "trained_parts":  # the checkpoint's own adapter (r=4) trains on; the warning says so
        assert len(differs) == 1 and "r=4" in differs[0] and "r=16" in differs[0], differs
        assert {module.r["default"] for module in scorer.modules() if hasattr(module, "lora_A")} == {4}
    else:
        assert not differs
    before = {name: param.detach().clone() for name, param in scorer.named_parameters() if param.requires_grad}
    assert before and all("lora_" in name or name.startswith("head.") for name in before)
    trainer.train()
    assert any(not torch.equal(before[name], param) for name, param in scorer.named_parameters() if name in before)
    trainer.save_model()

    loaded = QScorer.from_pretrained(tmp_path / "run")
    assert loaded.config.weights_format == "trained_parts"
    assert loaded.config.base_model == str(
        (final.parent.parent / "base" if form == "trained_parts" else checkpoint).resolve()
    )
    torch.testing.assert_close(scores(loaded, pixels(3, 4)), scores(trainer.model, pixels(3, 4)), atol=1e-5, rtol=0)


def test_a_peft_config_that_describes_the_checkpoints_adapter_continues_it_silently(final, tmp_path):
    scorer = QScorer.from_pretrained(final, merge_lora=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the adapter `qscorer train` wrote: r=4, alpha 8, q_proj / v_proj
        QScorerRewardTrainer(
            model=scorer, args=pairwise_args(tmp_path / "run"), train_dataset=pairs(),
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        )  # fmt: skip


def test_a_scorer_whose_adapter_was_merged_is_refused_before_training(final, tmp_path):
    scorer = QScorer.from_pretrained(final)  # merge_lora=True: the adapter is gone into the weights
    with pytest.raises(ValueError, match="merged into its weights when it was loaded.*merge_lora=False"):
        QScorerRewardTrainer(
            model=scorer, args=pairwise_args(tmp_path / "run"), train_dataset=pairs(),
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        )  # fmt: skip
