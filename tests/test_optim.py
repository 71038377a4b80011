"""Optimizer-state details of the training path that CPU can check without megatron-core's GPU optimizer."""

from __future__ import annotations

import copy

import pytest
import torch

from megatron_lasp.training.optim import restore_adam_steps


def _adam(params):
    return torch.optim.AdamW(params, lr=1e-2, foreach=True)


def _train(opt, params, steps):
    for _ in range(steps):
        for p in params:
            p.grad = torch.ones_like(p) * (1.0 + p.detach().abs())
        opt.step()


def _megatron_like_load(opt, params, saved, shared):
    """What megatron-core's DistributedOptimizer load leaves with torch's Adam: the step in the
    param group, per-parameter steps at the template's 0 or one tensor shared by all."""
    opt.load_state_dict(copy.deepcopy(saved))
    step = float(opt.state[params[0]]["step"])
    zero = torch.zeros((), dtype=torch.float32)
    for p in params:
        opt.state[p]["step"] = zero if shared else torch.zeros((), dtype=torch.float32)
    for group in opt.param_groups:
        group["step"] = step


@pytest.mark.parametrize("shared", [True, False], ids=["shared-step", "zero-steps"])
def test_restore_adam_steps_continues_like_the_uninterrupted_run(shared):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
    opt = _adam(params)
    _train(opt, params, 2)
    saved = copy.deepcopy(opt.state_dict())
    start = [p.detach().clone() for p in params]
    _train(opt, params, 2)  # the uninterrupted run

    # without the repair the continued run differs (wrong bias correction)
    broken = [torch.nn.Parameter(p.clone()) for p in start]
    bad = _adam(broken)
    _megatron_like_load(bad, broken, saved, shared)
    _train(bad, broken, 2)
    assert not all(torch.equal(p, q) for p, q in zip(broken, params))

    resumed = [torch.nn.Parameter(p.clone()) for p in start]
    good = _adam(resumed)
    _megatron_like_load(good, resumed, saved, shared)
    assert restore_adam_steps(good) == len(resumed)
    assert restore_adam_steps(good) == 0
    _train(good, resumed, 2)
    for p, want in zip(resumed, params):
        assert float(good.state[p]["step"]) == 4.0
        assert torch.equal(p, want)
