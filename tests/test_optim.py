"""MuonAdam: Muon on convolution filters, Adam on everything else."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mnist_cnn import build_model
from mnist_cnn.optim import MuonAdam, orthogonalize
from mnist_cnn.recipes import resolve_recipe
from mnist_cnn.train import make_optimizer


def _loss(model: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    return nn.functional.cross_entropy(model(x), y)


def _steps(model: nn.Module, optimizer: torch.optim.Optimizer, seeds) -> None:
    for seed in seeds:
        optimizer.zero_grad(set_to_none=True)
        _loss(model, seed).backward()
        optimizer.step()


@pytest.mark.parametrize("shape", [(9, 16), (32, 144), (32, 288), (10, 40), (3, 500)])
def test_orthogonalize_sets_every_singular_value_near_one(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    g[0] *= 100  # one direction far larger than the rest, as gradients often have
    s = torch.linalg.svdvals(orthogonalize(g[None])[0])
    assert s.min() > 0.6 and s.max() < 1.25
    # Same singular vectors: the result is U f(S) V^T of g.
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    inner = u.T @ orthogonalize(g[None])[0] @ vh.T
    assert torch.allclose(inner, torch.diag(torch.diagonal(inner)), atol=2e-4)


def test_zero_padding_orthogonalizes_each_matrix_as_if_alone():
    gen = torch.Generator().manual_seed(1)
    small, large = torch.randn(9, 16, generator=gen), torch.randn(32, 288, generator=gen)
    batch = torch.zeros(2, 32, 288)
    batch[0, :9, :16], batch[1] = small, large
    together = orthogonalize(batch)
    assert torch.allclose(together[0, :9, :16], orthogonalize(small[None])[0], atol=1e-6)
    assert together[0, 9:].abs().max() == 0 and together[0, :, 16:].abs().max() == 0
    assert torch.allclose(together[1], orthogonalize(large[None])[0], atol=1e-6)


def test_filters_take_muon_steps_and_the_rest_takes_adams_exactly():
    torch.manual_seed(0)
    model = build_model("fast")
    twin = build_model("fast")
    twin.load_state_dict(model.state_dict())
    lr = 1e-3
    muon = MuonAdam(model, lr=lr)
    others = [p for p in twin.parameters() if p.ndim != 4]
    adam = torch.optim.Adam(others, lr=lr, fused=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for seed in range(3):
        for m, opt in ((model, muon), (twin, adam)):
            opt.zero_grad(set_to_none=True)
            _loss(m, seed).backward()
            opt.step()
        # Same inputs need the same filters: copy the Muon filters into the twin.
        with torch.no_grad():
            for p, q in zip(model.parameters(), twin.parameters(), strict=True):
                if p.ndim == 4:
                    q.copy_(p)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if p.ndim != 4:
            assert torch.equal(p, q), name
    # Each filter entry moves by about muon_rms * lr per step (three steps, same sign or not).
    for name, p in model.named_parameters():
        if p.ndim == 4:
            rms = (p - before[name]).pow(2).mean().sqrt().item()
            assert 0.4 * lr * 0.5 < rms < 0.4 * lr * 3 * 1.3, (name, rms)


def test_a_tall_filter_bank_is_orthogonalized_along_its_short_side():
    conv = nn.Conv2d(1, 16, 3)  # 16 x 9: more outputs than inputs
    opt = MuonAdam(conv, lr=1.0, momentum=0.0, muon_rms=1.0)
    before = conv.weight.detach().clone()
    conv.weight.grad = torch.randn_like(conv.weight)
    conv.bias.grad = torch.zeros_like(conv.bias)
    expected = orthogonalize(conv.weight.grad.reshape(16, 9).T[None])[0].T * 16**0.5
    opt.step()
    assert torch.allclose(before - conv.weight, expected.reshape(16, 1, 3, 3), atol=1e-5)


def test_channels_last_filters_take_the_same_steps():
    torch.manual_seed(0)
    a = build_model("fast")
    b = build_model("fast").to(memory_format=torch.channels_last)
    b.load_state_dict(a.state_dict())
    _steps(a, MuonAdam(a, lr=1e-2), range(3))
    _steps(b, MuonAdam(b, lr=1e-2), range(3))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_weight_decay_shrinks_filters_before_the_step():
    conv = nn.Conv2d(4, 8, 3, bias=False)
    opt = MuonAdam(conv, lr=0.1, weight_decay=0.5)
    conv.weight.grad = torch.zeros_like(conv.weight)  # no gradient: decay alone moves it
    before = conv.weight.detach().clone()
    opt.step()
    assert torch.allclose(conv.weight, before * (1 - 0.1 * 0.5))


def test_state_dict_round_trip_continues_bit_for_bit():
    torch.manual_seed(0)
    model = build_model("fast")
    opt = MuonAdam(model, lr=1e-2)
    _steps(model, opt, range(2))
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())
    _steps(model, opt, range(2, 4))

    again = build_model("fast")
    again.load_state_dict(saved_model)
    opt2 = MuonAdam(again, lr=1e-2)
    opt2.load_state_dict(saved_opt)
    _steps(again, opt2, range(2, 4))
    for p, q in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)


def test_the_fast_recipe_trains_with_muon():
    recipe = resolve_recipe("fast")
    assert recipe.optimizer == "muon"
    optimizer = make_optimizer(recipe, build_model("fast"))
    assert isinstance(optimizer, MuonAdam)
    assert [len(g["params"]) for g in optimizer.param_groups] == [3, 7]


def test_a_network_without_filters_takes_adam_steps_only():
    model = nn.Linear(4, 2)
    opt = MuonAdam(model, lr=1e-2)
    assert len(opt.param_groups) == 1 and not opt.param_groups[0]["muon"]
    model(torch.ones(1, 4)).sum().backward()
    before = model.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.weight)
