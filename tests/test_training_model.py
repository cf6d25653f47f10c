"""The trainable model: what it trains, that its scores and cross-entropy equal the plain model's,
and that its export loads back with the same scores (LoRA, trained vision tower, merged form)."""

import pytest
import torch
from peft import LoraConfig

from qscorer_reward import QScorer
from qscorer_reward.score_tokens import set_score_token_rows
from qscorer_reward.testing import tiny_base_model
from qscorer_reward.training.export import save_merged, save_trained_parts, save_whole
from qscorer_reward.training.losses import score_token_ce_loss
from qscorer_reward.training.model import QScorerForTraining, TrainableParts, answer_token_count

ANSWER = "The quality of the image is"
_generator = torch.Generator().manual_seed(0)
IMAGES = [torch.rand(3, 56, 70, generator=_generator), torch.rand(3, 84, 56, generator=_generator)]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    model, tokenizer = tiny_base_model("qwen2_5_vl", seed=3)
    directory = tmp_path_factory.mktemp("base") / "tiny"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _training_model(base_dir, num_score_tokens=2, vision=False, merger=False, seed=0):
    torch.manual_seed(seed)
    scorer = QScorer.from_base_model(base_dir, num_score_tokens=num_score_tokens, max_pixels=112 * 112)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r"model\.language_model\..*\.(q_proj|v_proj)")
    parts = TrainableParts(lora=lora, vision_tower=vision, merger=merger)
    model = QScorerForTraining(scorer, parts, answer_token_count(scorer, ANSWER), gradient_checkpointing=False)
    # Move everything trained away from its initial value, as training would.
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


def test_answer_token_count_locates_the_answer_prefix(base_dir):
    scorer = QScorer.from_base_model(base_dir, max_pixels=112 * 112)
    count = answer_token_count(scorer, ANSWER)
    assert scorer.tokenizer.decode(scorer.backbone.suffix_ids[-count:]) == ANSWER
    assert answer_token_count(scorer, "") == 0
    with pytest.raises(ValueError, match="does not end with the answer text"):
        answer_token_count(scorer, "Quality:")


@pytest.mark.parametrize(("vision", "merger"), [(False, False), (True, False), (False, True)])
def test_only_the_chosen_parts_are_trainable(base_dir, vision, merger):
    names = _training_model(base_dir, vision=vision, merger=merger).trainable_parameter_names()
    lora = [n for n in names if "lora_" in n]
    assert lora and all(".language_model." in n and ("q_proj" in n or "v_proj" in n) for n in lora)
    assert {"score_token_rows.input_rows", "score_token_rows.output_rows"} <= set(names)
    assert any(n.startswith("scorer.head.") for n in names)
    visual = [n for n in names if ".visual." in n]
    assert any("merger" not in n for n in visual) == vision
    assert any("merger" in n for n in visual) == merger
    others = set(names) - set(lora) - set(visual) - {"score_token_rows.input_rows", "score_token_rows.output_rows"}
    assert all(n.startswith("scorer.head.") for n in others)  # embeddings, lm_head, LLM weights frozen


def test_scores_and_cross_entropy_equal_the_plain_model_with_the_rows_written_in(base_dir):
    model = _training_model(base_dir)
    pixels = [image.clone() for image in IMAGES]
    with torch.no_grad():
        outputs = model(pixels)
    # Reference: remove the substitution, write the rows into the embedding matrices, use the
    # QScorer call and the transformers model's own full forward for the logits.
    rows = model.score_token_rows
    rows.remove_hook()
    backbone = model.scorer.backbone
    set_score_token_rows(backbone.model, model.scorer.config.score_token_ids,
                         {"input_embeddings": rows.input_rows, "output_embeddings": rows.output_rows})  # fmt: skip
    with torch.no_grad():
        assert torch.allclose(outputs["scores"], model.scorer(IMAGES), atol=1e-5)
        inputs = backbone.prepare(pixels)
        logits = backbone.model(
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, **inputs.model_inputs
        ).logits
    count, k = model.answer_length, model.scorer.config.num_score_tokens
    rows_of = [torch.arange(int(s) - count, int(s) + k) for s in inputs.score_positions]
    selected = torch.stack([logits[b, r] for b, r in enumerate(rows_of)])
    targets = torch.stack([inputs.input_ids[b, r + 1] for b, r in enumerate(rows_of)])
    assert outputs["ce_loss"].item() == pytest.approx(score_token_ce_loss(selected, targets).item(), rel=1e-5)


def test_gradients_reach_every_trained_part(base_dir):
    model = _training_model(base_dir, num_score_tokens=2, vision=True, merger=True).train()
    outputs = model([image.clone() for image in IMAGES])
    (outputs["raw_scores"].sum() + outputs["ce_loss"]).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    frozen = model.scorer.backbone.model.get_input_embeddings().weight
    assert frozen.grad is None


def test_a_whole_language_model_is_trained_and_exported_without_lora(base_dir, tmp_path):
    torch.manual_seed(0)
    scorer = QScorer.from_base_model(base_dir, num_score_tokens=1, max_pixels=112 * 112)
    parts = TrainableParts(lora=None, vision_tower=True, merger=True, language_model=True)
    model = QScorerForTraining(scorer, parts, answer_token_count(scorer, ANSWER), gradient_checkpointing=False)
    names = set(model.trainable_parameter_names())
    language = {n for n in names if ".language_model." in n}
    all_language = {n for n, _ in model.named_parameters() if ".language_model." in n}
    assert language == {n for n in all_language if "embed_tokens" not in n}  # layers and final norm
    assert not any("lora_" in n or "lm_head" in n for n in names)
    model.train()
    model(IMAGES)["scores"].sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in language and "layers.0." in n)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in language:
                param.add_(0.05)
        expected = model.eval()([image.clone() for image in IMAGES])["scores"]
    directory = save_trained_parts(model, model.state_dict(), tmp_path / "parts")
    assert not (directory / "adapter_model.safetensors").exists()
    assert torch.allclose(QScorer.from_pretrained(directory)(IMAGES), expected, atol=1e-5)
    merged = save_merged(directory, tmp_path / "merged")
    assert torch.allclose(QScorer.from_pretrained(merged)(IMAGES), expected, atol=1e-5)


class PixelMeanAid(torch.nn.Module):
    """A training aid for the tests: a score from each image's mean patch, which every forward
    pass sees in its `BackboneInputs`."""

    def __init__(self, patch_values: int):
        super().__init__()
        self.layer = torch.nn.Linear(patch_values, 1)

    def forward(self, inputs):
        patches = inputs.model_inputs["pixel_values"]
        counts = inputs.model_inputs["image_grid_thw"].prod(-1).tolist()
        means = torch.stack([chunk.mean(0) for chunk in patches.split(counts)])
        return {"aid_scores": self.layer(means.float()).squeeze(-1)}


def test_a_training_aid_runs_in_every_forward_trains_and_leaves_no_trace_in_the_export(base_dir, tmp_path):
    model = _training_model(base_dir, merger=True)
    model.add_training_aid("pixel_mean", PixelMeanAid(3 * 2 * 14 * 14).to(torch.float64))
    aid = model.training_aids["pixel_mean"]
    assert aid.layer.weight.dtype == torch.float32  # trained weights are kept in float32
    assert "training_aids.pixel_mean.layer.weight" in model.trainable_parameter_names()
    outputs = model.train()([image.clone() for image in IMAGES])
    assert outputs["aid_scores"].shape == (2,) and {"scores", "raw_scores", "ce_loss"} <= outputs.keys()
    outputs["aid_scores"].sum().backward()
    assert aid.layer.weight.grad is not None

    directory = save_trained_parts(model, model.state_dict(), tmp_path / "parts")
    with torch.no_grad():
        expected = model.eval()([image.clone() for image in IMAGES])["scores"]
    assert torch.allclose(QScorer.from_pretrained(directory, merge_lora=False)(IMAGES), expected, atol=1e-5)


def test_a_vision_only_forward_runs_the_tower_without_the_language_model(base_dir):
    model = _training_model(base_dir, vision=True)
    tower_calls, language_calls = [], []
    backbone = model.scorer.backbone.model.model
    backbone.visual.register_forward_hook(lambda *args: tower_calls.append(1))
    backbone.language_model.register_forward_hook(lambda *args: language_calls.append(1))
    with pytest.raises(ValueError, match="vision_only needs a training aid"):
        model(IMAGES, vision_only=True)
    model.add_training_aid("pixel_mean", PixelMeanAid(3 * 2 * 14 * 14))
    with torch.no_grad():
        full = model(IMAGES)
        vision_only = model(IMAGES, vision_only=True)
    assert vision_only.keys() == {"aid_scores"} and len(language_calls) == 1 and len(tower_calls) == 2
    torch.testing.assert_close(vision_only["aid_scores"], full["aid_scores"])


def test_export_loads_with_the_same_scores_including_a_trained_vision_tower(base_dir, tmp_path):
    model = _training_model(base_dir, vision=True, merger=True)
    with torch.no_grad():
        expected = model([image.clone() for image in IMAGES])["scores"]
    directory = save_trained_parts(model, model.state_dict(), tmp_path / "parts", model_name="tiny-test")
    files = {p.name for p in directory.iterdir()}
    assert {"adapter_model.safetensors", "score_tokens.safetensors", "head.safetensors"} <= files
    assert "trained_modules.safetensors" in files and "model.safetensors" not in files
    loaded = QScorer.from_pretrained(directory, merge_lora=False)
    assert loaded.config.model_name == "tiny-test" and loaded.config.weights_format == "trained_parts"
    assert torch.allclose(loaded(IMAGES), expected, atol=1e-5)
    assert torch.allclose(QScorer.from_pretrained(directory)(IMAGES), expected, atol=1e-4)  # LoRA merged

    merged = save_merged(directory, tmp_path / "merged")
    assert (merged / "model.safetensors").is_file()
    assert torch.allclose(QScorer.from_pretrained(merged)(IMAGES), expected, atol=1e-4)
    assert not list(tmp_path.glob(".*partial*"))


def test_trained_modules_with_unknown_or_misshaped_tensors_are_refused(base_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _training_model(base_dir, merger=True)
    directory = save_trained_parts(model, model.state_dict(), tmp_path / "parts")
    path = directory / "trained_modules.safetensors"
    tensors = load_file(path)
    name = next(iter(tensors))
    save_file({**tensors, name: tensors[name][:1]}, path)
    with pytest.raises(ValueError, match=rf"tensor '{name}' has shape"):
        QScorer.from_pretrained(directory)
    save_file({**tensors, "model.visual.extra.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not in the backbone model"):
        QScorer.from_pretrained(directory)


def test_the_whole_weights_export_merges_the_adapter_and_the_rows_and_scores_the_same(base_dir, tmp_path):
    model = _training_model(base_dir, vision=True, merger=True)
    with torch.no_grad():
        expected = model([image.clone() for image in IMAGES])["scores"]
    directory = save_whole(model, model.state_dict(), tmp_path / "whole", model_name="tiny-whole")
    files = {p.name for p in directory.iterdir()}
    assert "model.safetensors" in files and not files & {"adapter_model.safetensors", "score_tokens.safetensors"}
    loaded = QScorer.from_pretrained(directory)
    assert (loaded.config.weights_format, loaded.config.model_name) == ("full", "tiny-whole")
    assert torch.allclose(loaded(IMAGES), expected, atol=1e-5)
