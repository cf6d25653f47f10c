import pytest
import torch
from torch import nn

from recipes.qscorer_tiny.optimizers import MuonWithAdamW, muon_parameter_names, orthogonalise


def gradients_for(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return [torch.randn(p.shape, generator=generator) for p in params]


def run_steps(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: int = 5) -> None:
    for step in range(steps):
        for param, grad in zip(params, gradients_for(params, step)):
            param.grad = grad
        optimizer.step()


def fresh(shapes) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]


def test_the_muon_groups_step_as_torchs_muon_matched_to_adamw():
    shapes = [(48, 16), (16, 48), (32, 32)]
    ours, reference = fresh(shapes), fresh(shapes)
    run_steps(MuonWithAdamW([{"params": ours, "muon": True}], lr=0.02, weight_decay=0.1), ours)
    torch_muon = torch.optim.Muon(reference, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    run_steps(torch_muon, reference)
    for got, expected, start in zip(ours, reference, fresh(shapes)):
        assert not torch.allclose(got, start)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_the_other_groups_step_as_torchs_adamw():
    shapes = [(7,), (3, 5), (2, 3, 4)]
    ours, reference = fresh(shapes), fresh(shapes)
    run_steps(MuonWithAdamW([{"params": ours}], lr=0.01, betas=(0.8, 0.99), weight_decay=0.05), ours)
    run_steps(torch.optim.AdamW(reference, lr=0.01, betas=(0.8, 0.99), weight_decay=0.05), reference)
    for got, expected in zip(ours, reference):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_orthogonalise_gives_singular_values_near_one_whatever_the_scale():
    matrix = torch.randn(40, 24) * 1e3
    singular_values = torch.linalg.svdvals(orthogonalise(matrix).float())
    assert orthogonalise(matrix).shape == (40, 24)
    assert singular_values.min() > 0.5 and singular_values.max() < 1.3


def test_muon_groups_take_matrices_only():
    with pytest.raises(ValueError, match="2-D weight matrices only"):
        MuonWithAdamW([{"params": [nn.Parameter(torch.zeros(4))], "muon": True}])


def test_a_state_dict_round_trip_continues_the_same_trajectory():
    shapes = [(8, 6), (6,)]
    uninterrupted = fresh(shapes)
    groups = lambda params: [{"params": params[:1], "muon": True}, {"params": params[1:]}]  # noqa: E731
    run_steps(MuonWithAdamW(groups(uninterrupted), lr=0.01), uninterrupted, steps=6)
    resumed = fresh(shapes)
    first = MuonWithAdamW(groups(resumed), lr=0.01)
    run_steps(first, resumed, steps=3)
    second = MuonWithAdamW(groups(resumed), lr=0.01)
    second.load_state_dict(first.state_dict())
    for step in range(3, 6):
        for param, grad in zip(resumed, gradients_for(resumed, step)):
            param.grad = grad
        second.step()
    for got, expected in zip(resumed, uninterrupted):
        torch.testing.assert_close(got, expected)


def test_muon_takes_the_hidden_matrices_of_linear_layers():
    from peft import LoraConfig, get_peft_model

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.conv = nn.Conv2d(3, 8, 2)
            self.hidden = nn.Linear(8, 16)
            self.attention = nn.Linear(16, 16)
            self.output = nn.Linear(16, 1)

    names = muon_parameter_names(Tiny())
    assert names == {"hidden.weight", "attention.weight"}
    adapted = get_peft_model(Tiny(), LoraConfig(r=2, target_modules=["attention"]))
    assert muon_parameter_names(adapted) == {
        "base_model.model.hidden.weight",
        "base_model.model.attention.base_layer.weight",
    }
