"""The vision towers' fast paths: packed attention gives the same results as one SDPA call per
segment, and the patch embedding as a matrix product the same as its convolution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qscorer_reward.backbones.qwen_vl import PatchProjection
from qscorer_reward.backbones.vision_attention import PACKED_SDPA, packed_sdpa_attention, segment_layout
from qscorer_reward.testing import FAMILIES, tiny_scorer


def per_segment_attention(query, key, value, boundaries):
    """Reference: one SDPA call per segment, ``[1, tokens, heads, head_dim]``."""
    outputs = [
        F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, start:end], value[:, :, start:end])
        for start, end in zip(boundaries[:-1], boundaries[1:])
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2)


def test_equal_segments_need_no_reordering():
    layout = segment_layout(torch.tensor([0, 16, 32, 48, 64], dtype=torch.int32))
    assert layout.groups == ((16, 4),)
    assert layout.order is None and layout.inverse is None


def test_runs_of_one_length_each_need_no_reordering():
    layout = segment_layout(torch.tensor([0, 16, 32, 36, 40], dtype=torch.int32))
    assert layout.groups == ((16, 2), (4, 2))
    assert layout.order is None


def test_interleaved_lengths_are_grouped():
    boundaries = [0, 4, 8, 10, 14, 16, 17]
    layout = segment_layout(torch.tensor(boundaries))
    assert layout.groups == ((4, 3), (2, 2), (1, 1))
    assert layout.order.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 8, 9, 14, 15, 16]
    assert torch.equal(layout.order[layout.inverse], torch.arange(17))


@pytest.mark.parametrize("boundaries", [[0, 8, 16, 24], [0, 16, 20, 36, 40, 41, 57]])
def test_matches_one_call_per_segment_with_gradients(boundaries):
    generator = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(1, 2, boundaries[-1], 8, generator=generator, dtype=torch.float64, requires_grad=True)
        for _ in range(3)
    ]
    cu_seqlens = torch.tensor(boundaries, dtype=torch.int32)
    packed, weights = packed_sdpa_attention(None, *tensors, attention_mask=None, cu_seq_lens_q=cu_seqlens)
    reference = per_segment_attention(*tensors, boundaries)
    assert weights is None
    assert packed.shape == (1, boundaries[-1], 2, 8)
    torch.testing.assert_close(packed, reference)
    upstream = torch.randn(packed.shape, generator=generator, dtype=torch.float64)
    packed_grads = torch.autograd.grad((packed * upstream).sum(), tensors)
    reference_grads = torch.autograd.grad((reference * upstream).sum(), tensors)
    for packed_grad, reference_grad in zip(packed_grads, reference_grads):
        torch.testing.assert_close(packed_grad, reference_grad)


def test_without_segments_it_is_plain_sdpa():
    query, key, value = torch.randn(3, 1, 2, 10, 8).unbind(0)
    output, _ = packed_sdpa_attention(None, query, key, value, attention_mask=None, scaling=0.5)
    expected = F.scaled_dot_product_attention(query, key, value, scale=0.5).transpose(1, 2)
    torch.testing.assert_close(output, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_scorer_uses_it_and_scores_as_with_transformers_sdpa(family):
    scorer = tiny_scorer(family, max_pixels=224 * 224)
    vision_config = scorer.backbone.model.model.visual.config
    assert vision_config._attn_implementation == PACKED_SDPA
    generator = torch.Generator().manual_seed(1)
    # mixed sizes: images of different lengths, windows cut short at the edges (qwen2_5_vl)
    images = [torch.rand(3, *size, generator=generator) for size in ((224, 224), (140, 196), (84, 252))]
    results = {}
    for implementation in (PACKED_SDPA, "sdpa"):
        vision_config._attn_implementation = implementation
        pixels = [image.clone().requires_grad_(True) for image in images]
        scores = scorer(pixels)
        results[implementation] = (scores, torch.autograd.grad(scores.sum(), pixels))
    torch.testing.assert_close(results[PACKED_SDPA][0], results["sdpa"][0])
    for packed_grad, sdpa_grad in zip(results[PACKED_SDPA][1], results["sdpa"][1]):
        torch.testing.assert_close(packed_grad, sdpa_grad)


def test_other_attention_implementations_are_left_alone():
    from qscorer_reward import QScorer
    from qscorer_reward.testing import tiny_base_model

    model, tokenizer = tiny_base_model()
    model.model.visual.config._attn_implementation = "eager"
    scorer = QScorer.from_base_model(model, tokenizer)
    assert scorer.backbone.model.model.visual.config._attn_implementation == "eager"


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_projection_is_a_matrix_product_equal_to_the_convolution(family):
    scorer = tiny_scorer(family)
    projection = scorer.backbone.model.model.visual.patch_embed.proj
    assert type(projection) is PatchProjection
    assert set(projection.state_dict()) == ({"weight", "bias"} if projection.bias is not None else {"weight"})
    projection.double().requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    patches = torch.randn(40, projection.in_channels, *projection.kernel_size, generator=generator, dtype=torch.float64)
    output = projection(patches)
    reference = torch.nn.Conv3d.forward(projection, patches)
    assert output.shape == reference.shape == (40, projection.out_channels, 1, 1, 1)
    torch.testing.assert_close(output, reference)
    upstream = torch.randn(output.shape, generator=generator, dtype=torch.float64)
    weights = list(projection.parameters())
    fast = torch.autograd.grad((output * upstream).sum(), weights)
    slow = torch.autograd.grad((reference * upstream).sum(), weights)
    for fast_grad, slow_grad in zip(fast, slow):
        torch.testing.assert_close(fast_grad, slow_grad)
    # Inputs larger than one kernel still convolve.
    frames = torch.randn(2, projection.in_channels, 4, 28, 28, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(projection(frames), torch.nn.Conv3d.forward(projection, frames))


@pytest.mark.parametrize(
    "options",
    [dict(padding=1), dict(dilation=2), dict(groups=3), dict(stride=(1, 7, 7))],
    ids=["padding", "dilation", "groups", "stride"],
)
def test_patch_projection_replaces_only_convolutions_that_are_matrix_products(options):
    assert PatchProjection.can_replace(torch.nn.Conv3d(3, 6, (2, 14, 14), stride=(2, 14, 14)))
    arguments = dict(stride=(2, 14, 14)) | options
    assert not PatchProjection.can_replace(torch.nn.Conv3d(3, 6, (2, 14, 14), **arguments))
