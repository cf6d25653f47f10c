import torch

from qscorer_reward import ScoreHead
from qscorer_reward.head import soft_clamp


def test_shape_and_init():
    head = ScoreHead(64)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 16), (16, 1)]
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)
    assert head(torch.randn(7, 64)).shape == (7,)


def test_zero_input_scores_the_middle_of_the_range():
    head = ScoreHead(8, score_range=(1.0, 5.0))
    assert torch.allclose(head(torch.zeros(2, 8)), torch.tensor([3.0, 3.0]), atol=1e-4)


def test_soft_clamp_bounds_and_keeps_gradient():
    x = torch.linspace(-20, 20, 401, requires_grad=True)
    y = soft_clamp(x, 1.0, 5.0, 8.0)
    assert (y >= 1.0).all() and (y <= 5.0).all()
    assert (y[(x > -0.5) & (x < 6.5)] > 1.0).all() and (y[(x > -0.5) & (x < 6.5)] < 5.0).all()
    (grad,) = torch.autograd.grad(y.sum(), x)
    interior = (x > 2.0) & (x < 4.0)
    assert torch.allclose(y[interior], x[interior], atol=1e-3)
    assert torch.allclose(grad[interior], torch.ones_like(grad[interior]), atol=1e-2)
    # just past the ends the gradient is reduced but not zero, unlike torch.clamp
    near_edges = (x > 5.0) & (x < 5.2)
    assert (grad[near_edges] > 0.1).all()
    assert (grad[(x > -0.5) & (x < 6.5)] > 0).all()


def test_head_stays_float32_when_the_model_goes_to_half_precision():
    model = torch.nn.ModuleDict({"head": ScoreHead(16), "body": torch.nn.Linear(4, 4)}).to(torch.bfloat16)
    assert model["body"].weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model["head"].parameters())
    out = model["head"](torch.randn(3, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.float32
