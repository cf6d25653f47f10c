"""The QScorer callable on every backbone family: outputs, batching, gradients, precision."""

import numpy as np
import pytest
import torch
from conftest import shared_scorer
from PIL import Image

from qscorer_reward.preprocessing import to_unit_pixels
from qscorer_reward.testing import tiny_scorer


def _images(sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=generator) for h, w in sizes]


@pytest.mark.parametrize("num_score_tokens", [1, 5])
def test_scores_have_the_contract_shape_dtype_and_range(family, num_score_tokens):
    scorer = shared_scorer(family, num_score_tokens)
    images = torch.rand(3, 3, 56, 70, generator=torch.Generator().manual_seed(0))
    scores = scorer(images)
    assert scores.shape == (3,)
    assert scores.dtype == torch.float32
    assert scores.device == scorer.device
    low, high = scorer.score_range
    assert scorer.score_range == (1.0, 5.0)
    assert ((scores >= low) & (scores <= high)).all()
    assert torch.equal(scores, scorer(images))
    assert scorer(images[0]).shape == (1,)
    assert scorer.lower_better is False


@pytest.mark.parametrize("num_score_tokens", [1, 5])
def test_score_tokens_follow_the_score_position(family, num_score_tokens):
    scorer = shared_scorer(family, num_score_tokens)
    config = scorer.config
    assert len(config.score_token_ids) == num_score_tokens
    assert scorer.tokenizer.convert_ids_to_tokens(config.score_token_ids) == config.score_tokens
    inputs = scorer.backbone.prepare(_images([(40, 60), (90, 50)]))
    for row, position in zip(inputs.input_ids, inputs.score_positions):
        after = row[position + 1 : position + 1 + num_score_tokens].tolist()
        assert after == config.score_token_ids
        assert row[position].item() == scorer.backbone.suffix_ids[-1]


def test_score_token_rows_start_at_the_mean_of_the_existing_rows():
    from qscorer_reward import QScorer
    from qscorer_reward.testing import tiny_base_model

    model, tokenizer = tiny_base_model("qwen2_vl")
    existing = len(tokenizer)
    mean_in = model.get_input_embeddings().weight[:existing].mean(0)
    mean_out = model.get_output_embeddings().weight[:existing].mean(0)
    scorer = QScorer.from_base_model(model, tokenizer, num_score_tokens=5)
    ids = scorer.config.score_token_ids
    assert ids == list(range(existing, existing + 5))
    assert model.get_input_embeddings().weight.shape[0] >= existing + 5  # resized past the spare rows
    assert torch.allclose(model.get_input_embeddings().weight[ids], mean_in.expand(5, -1))
    assert torch.allclose(model.get_output_embeddings().weight[ids], mean_out.expand(5, -1))


def test_rotary_positions_match_the_models_own_computation(family):
    scorer = shared_scorer(family)
    inputs = scorer.backbone.prepare(_images([(40, 60), (90, 50), (56, 56)]))
    model = scorer.backbone.model.model
    image_tokens = (inputs.input_ids == scorer.backbone.model.config.image_token_id).int()
    expected, _ = model.get_rope_index(
        inputs.input_ids, image_tokens, inputs.model_inputs["image_grid_thw"], attention_mask=inputs.attention_mask
    )
    real = inputs.attention_mask.bool()
    assert torch.equal(inputs.model_inputs["position_ids"][:, real], expected[:, real])


def test_score_equals_the_head_on_the_transformers_forward(family):
    """Our single forward pass (own positions, right padding) reads the same hidden state as the
    transformers model computing everything itself."""
    scorer = shared_scorer(family, 5)
    inputs = scorer.backbone.prepare(_images([(40, 60), (90, 50)]))
    image_tokens = (inputs.input_ids == scorer.backbone.model.config.image_token_id).int()
    with torch.no_grad():
        hidden = scorer.backbone.model.model(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            pixel_values=inputs.model_inputs["pixel_values"],
            image_grid_thw=inputs.model_inputs["image_grid_thw"],
            mm_token_type_ids=image_tokens,
            use_cache=False,
        ).last_hidden_state
        expected = scorer.head(hidden[torch.arange(2), inputs.score_positions])
        assert torch.allclose(scorer.score_inputs(inputs), expected, atol=1e-5)


def test_scores_do_not_depend_on_the_rest_of_the_batch(family):
    scorer = shared_scorer(family)
    images = _images([(40, 60), (90, 50), (56, 56), (120, 120), (33, 47)])
    together = scorer(images)
    alone = torch.cat([scorer([image]) for image in images])
    assert torch.allclose(together, alone, atol=1e-4, rtol=0)
    # equal sizes take the unpadded path
    same = torch.stack(_images([(56, 56)] * 4, seed=3))
    assert torch.allclose(scorer(same), torch.cat([scorer(image) for image in same]), atol=1e-4, rtol=0)


def test_batch_size_chunks_give_the_same_scores():
    scorer = shared_scorer()
    images = torch.rand(5, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(scorer(images, batch_size=2), scorer(images), atol=1e-5)
    mixed = _images([(40, 60), (90, 50), (56, 56)])
    assert torch.allclose(scorer(mixed, batch_size=1), scorer(mixed), atol=1e-4)
    with pytest.raises(ValueError, match="batch_size"):
        scorer(images, batch_size=0)


def test_gradient_reaches_the_input(family):
    scorer = shared_scorer(family)
    assert not any(p.requires_grad for p in scorer.parameters())
    images = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(0)).requires_grad_()
    scores = scorer(images)
    assert scores.grad_fn is not None
    scores.sum().backward()
    assert torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    # [-1, 1] input also differentiates, through the range mapping
    signed = (torch.rand(1, 3, 64, 64) * 2 - 1).requires_grad_()
    scorer(signed, input_range=(-1, 1)).sum().backward()
    assert signed.grad.abs().sum() > 0


def test_no_graph_is_built_when_nothing_needs_gradients():
    scorer = shared_scorer()
    assert scorer(torch.rand(1, 3, 56, 56)).grad_fn is None
    assert scorer(torch.randint(0, 256, (1, 3, 56, 56), dtype=torch.uint8)).grad_fn is None


def test_autograd_agrees_with_finite_differences_in_float64(family):
    """Central differences along random directions. transformers' RMSNorm computes in float32 even
    for float64 weights, so the differences carry float32 rounding: epsilon 1e-3 balances that
    against truncation error, and they agree with autograd to ~1e-4 (float32 noise in the scores
    sets the absolute floor)."""
    scorer = tiny_scorer(family, num_score_tokens=5).double()
    generator = torch.Generator().manual_seed(0)
    # values away from 0 and 1 so the clamps after each resize pass are inactive
    image = (0.2 + 0.6 * torch.rand(1, 3, 50, 62, generator=generator, dtype=torch.float64)).requires_grad_()
    score = scorer(image)
    assert score.dtype == torch.float64
    (grad,) = torch.autograd.grad(score.sum(), image)
    epsilon = 1e-3
    for _ in range(3):
        direction = torch.randn(image.shape, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            plus = scorer(image + epsilon * direction)
            minus = scorer(image - epsilon * direction)
        numeric = ((plus - minus) / (2 * epsilon)).item()
        analytic = (grad * direction).sum().item()
        assert numeric == pytest.approx(analytic, rel=3e-4, abs=3e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_backbone_returns_float32_scores_close_to_float32(dtype):
    full = tiny_scorer("qwen2_vl")
    half = tiny_scorer("qwen2_vl", dtype=dtype)
    assert half.dtype == dtype
    assert all(p.dtype == torch.float32 for p in half.head.parameters())
    images = torch.rand(3, 3, 56, 56, generator=torch.Generator().manual_seed(0), requires_grad=True)
    scores = half(images)
    assert scores.dtype == torch.float32
    assert torch.allclose(scores, full(images), atol=0.1)
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_gradient_checkpointing_recomputes_layers_and_gives_the_same_gradient():
    scorer = tiny_scorer("qwen2_5_vl")
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))

    def gradient_and_saved_numel():
        saved = []
        pixels = images.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            scores = scorer(pixels)
        scores.sum().backward()
        return pixels.grad, sum(saved)

    calls = []
    layer = scorer.backbone.model.model.language_model.layers[0]
    layer.self_attn.register_forward_hook(lambda *args: calls.append(1))
    plain, plain_saved = gradient_and_saved_numel()
    assert len(calls) == 1
    scorer.gradient_checkpointing_enable()
    assert scorer.is_gradient_checkpointing and not scorer.training
    calls.clear()
    checkpointed, checkpointed_saved = gradient_and_saved_numel()
    assert len(calls) == 2  # forward, then recomputed in backward
    assert checkpointed_saved < plain_saved / 2  # activations are not kept
    assert torch.allclose(plain, checkpointed, atol=1e-6)
    assert layer.training and not layer.self_attn.training  # dropout stays off
    scorer.eval()
    assert layer.training  # survives a later .eval()
    scorer.gradient_checkpointing_disable()
    assert not layer.training


def test_pil_numpy_and_paths_score_like_tensors(tmp_path):
    scorer = shared_scorer()
    array = np.random.default_rng(0).integers(0, 256, (60, 70, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(array).save(path)
    expected = scorer(torch.from_numpy(array).permute(2, 0, 1).float() / 255)
    for images in (Image.fromarray(array), array, path, [path], [array, Image.fromarray(array)]):
        scores = scorer(images)
        assert torch.allclose(scores, expected.expand_as(scores), atol=1e-5)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "images, error, message",
    [
        ([], ValueError, "empty batch"),
        (torch.rand(0, 3, 56, 56), ValueError, "empty batch"),
        (torch.rand(56, 56), ValueError, "shape \\(56, 56\\)"),
        (torch.rand(1, 1, 3, 56, 56), ValueError, "shape"),
        (torch.rand(1, 2, 56, 56), ValueError, "got 2"),
        (torch.rand(5, 56, 56), ValueError, "got 5"),
        (torch.full((1, 3, 56, 56), float("nan")), ValueError, "NaN"),
        (torch.full((1, 3, 56, 56), float("inf")), ValueError, "infinite"),
        (torch.rand(1, 3, 56, 56) * 255, ValueError, "0..255"),
        (torch.rand(1, 3, 56, 56) * 2 - 1, ValueError, "input_range=\\(-1, 1\\)"),
        (torch.rand(1, 3, 8, 8), ValueError, "8x8.*>= 14 px"),
        (torch.rand(1, 3, 14, 3000), ValueError, "aspect ratio"),
        (torch.zeros(1, 3, 56, 56, dtype=torch.int64), TypeError, "int64"),
        (np.zeros((56, 56, 3), dtype=np.int32), TypeError, "int32"),
        (42, TypeError, "int"),
        ([torch.rand(3, 56, 56), {"a": 1}], TypeError, "images\\[1\\] has unsupported type dict"),
        ([torch.rand(3, 56, 56), torch.rand(3, 56, 56) * 300], ValueError, "images\\[1\\] has values"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(images, error, message):
    with pytest.raises(error, match=message):
        shared_scorer()(images)


def test_bad_files_are_named(tmp_path):
    scorer = shared_scorer()
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    truncated = tmp_path / "cut.jpg"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[:300])
    for path, message in (
        (not_an_image, "notes.png: cannot read image"),
        (truncated, "cut.jpg: cannot read image"),
        (tmp_path / "missing.png", "missing.png: no such file"),
    ):
        with pytest.raises(ValueError, match=message):
            scorer([path])


def test_decompression_bomb_sized_file_is_refused(tmp_path):
    scorer = tiny_scorer()
    path = tmp_path / "bomb.png"
    Image.new("RGB", (400, 400)).save(path)
    scorer.max_image_pixels = 100_000
    with pytest.raises(ValueError, match="bomb.png.*decompression bomb"):
        scorer(path)


def test_value_range_check_allows_a_little_overshoot():
    pixels = to_unit_pixels(torch.full((1, 3, 20, 20), 1.08))
    assert pixels.max() == 1.0
