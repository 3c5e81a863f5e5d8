"""AdamW and SGD match torch.optim.AdamW / torch.optim.SGD step for step (float64, many steps,
several parameter groups, weight decay, parameters without gradients on some steps)."""
from __future__ import annotations

import copy

import pytest
import torch

from lmrun.optim import SGD, AdamW

from .helpers import MLP, regression_data


def groups_of(model: MLP, per_group: list[dict]) -> list[dict]:
    """Three groups: fc1 params, fc2 params, out params, with per-group options."""
    mods = [model.fc1, model.fc2, model.out]
    return [dict(params=list(m.parameters()), **opts) for m, opts in zip(mods, per_group)]


def run_pair(make_ours, make_ref, steps: int = 120, skip_every: int = 0):
    torch.manual_seed(0)
    ours_model = MLP()
    start = copy.deepcopy(ours_model)
    ref_model = copy.deepcopy(ours_model)
    ours, ref = make_ours(ours_model), make_ref(ref_model)
    x, y = regression_data()
    for step in range(steps):
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad(set_to_none=True)
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            if skip_every and step % skip_every == 0:  # fc2 gets no gradient this step
                model.fc2.weight.grad = None
            opt.step()
        for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{name} differs at step {step}")
    moved = max((a - b).abs().max().item() for a, b in zip(ours_model.parameters(), start.parameters()))
    assert moved > 1e-2, "the parameters barely moved: the comparison would be vacuous"
    return ours_model, ours, ref


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_matches_torch(wd):
    kw = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": wd}
    model, ours, _ = run_pair(lambda m: AdamW(m.parameters(), **kw),
                                lambda m: torch.optim.AdamW(m.parameters(), foreach=False, **kw), steps=150)
    state = ours.state[model.fc1.weight]
    assert state["step"] == 150 and state["exp_avg"].shape == model.fc1.weight.shape


def test_adamw_matches_torch_param_groups_and_missing_grads():
    per_group = [{"lr": 1e-2, "weight_decay": 0.0}, {"lr": 2e-3, "weight_decay": 0.3, "betas": (0.8, 0.99)},
                 {"eps": 1e-6}]
    run_pair(lambda m: AdamW(groups_of(m, per_group), lr=5e-3, weight_decay=0.05),
             lambda m: torch.optim.AdamW(groups_of(m, per_group), lr=5e-3, weight_decay=0.05, foreach=False),
             steps=110, skip_every=3)


def test_adamw_defaults_match_torch():
    p = torch.nn.Parameter(torch.zeros(1))
    ours, ref = AdamW([p]).defaults, torch.optim.AdamW([p]).defaults
    for key in ("lr", "betas", "eps", "weight_decay"):
        assert ours[key] == ref[key]


def test_adamw_moves_parameters_and_state_dict_round_trip():
    torch.manual_seed(0)
    model = MLP()
    start = copy.deepcopy(model)
    opt = AdamW(model.parameters(), lr=1e-2)
    x, y = regression_data()
    for _ in range(5):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    assert (model.fc1.weight - start.fc1.weight).abs().max() > 1e-2
    twin = copy.deepcopy(model)
    twin_opt = AdamW(twin.parameters(), lr=1e-2)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a checkpoint file
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        ((m(x) - y) ** 2).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [
    {"lr": 0.05},
    {"lr": 0.02, "momentum": 0.9},
    {"lr": 0.02, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
    {"lr": 0.02, "momentum": 0.8, "dampening": 0.1, "weight_decay": 1e-3},
])
def test_sgd_matches_torch(kwargs):
    run_pair(lambda m: SGD(m.parameters(), **kwargs),
             lambda m: torch.optim.SGD(m.parameters(), foreach=False, **kwargs), steps=100, skip_every=4)


def test_sgd_param_groups_match_torch():
    per_group = [{"lr": 0.05}, {"momentum": 0.5}, {"weight_decay": 0.1, "nesterov": True}]
    run_pair(lambda m: SGD(groups_of(m, per_group), lr=0.01, momentum=0.9),
             lambda m: torch.optim.SGD(groups_of(m, per_group), lr=0.01, momentum=0.9, foreach=False), steps=100)


@pytest.mark.parametrize("make", [
    lambda p: AdamW(p, lr=-1.0), lambda p: AdamW(p, betas=(1.0, 0.9)), lambda p: AdamW(p, betas=(0.9, -0.1)),
    lambda p: AdamW(p, eps=-1e-8), lambda p: AdamW(p, weight_decay=-0.1),
    lambda p: SGD(p, lr=-1.0), lambda p: SGD(p, nesterov=True), lambda p: SGD(p, momentum=-0.5),
])
def test_bad_hyperparameters_raise(make):
    with pytest.raises(ValueError):
        make([torch.nn.Parameter(torch.zeros(2))])
