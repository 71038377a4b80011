"""Optimizer-state details of the training path that CPU can check without megatron-core's GPU optimizer."""

from __future__ import annotations

import copy

import pytest
import torch

from megatron_lasp.training.optim import restore_adam_steps, use_fused_adam


def _adam(params, fused=False):
    opt = torch.optim.AdamW(params, lr=1e-2, foreach=True)
    if fused:
        assert use_fused_adam(opt) == 1
    return opt


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


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-step", "zero-steps"])
def test_restore_adam_steps_continues_like_the_uninterrupted_run(shared, fused):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
    opt = _adam(params, fused)
    _train(opt, params, 2)
    saved = copy.deepcopy(opt.state_dict())
    start = [p.detach().clone() for p in params]
    _train(opt, params, 2)  # the uninterrupted run

    # without the repair the continued run differs (wrong bias correction)
    broken = [torch.nn.Parameter(p.clone()) for p in start]
    bad = _adam(broken, fused)
    _megatron_like_load(bad, broken, saved, shared)
    _train(bad, broken, 2)
    assert not all(torch.equal(p, q) for p, q in zip(broken, params))

    resumed = [torch.nn.Parameter(p.clone()) for p in start]
    good = _adam(resumed, fused)
    _megatron_like_load(good, resumed, saved, shared)
    assert restore_adam_steps(good) == len(resumed)
    assert restore_adam_steps(good) == 0
    _train(good, resumed, 2)
    for p, want in zip(resumed, params):
        assert float(good.state[p]["step"]) == 4.0
        assert torch.equal(p, want)


def test_use_fused_adam_runs_the_fused_kernel_on_the_same_update():
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(7)]

    def run(make):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = make(params)
        _train(opt, params, 3)
        return params, opt

    switched, opt = run(lambda ps: _adam(ps, fused=True))
    assert all(g["fused"] and not g["foreach"] for g in opt.param_groups)
    assert all(opt.state[p]["step"].dtype == torch.float32 for p in switched)
    built, _ = run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True))
    multi, _ = run(_adam)
    for a, b, c in zip(switched, built, multi):
        assert torch.equal(a, b)  # exactly torch's fused AdamW
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)  # the multi-tensor update, up to rounding


def test_use_fused_adam_leaves_what_it_cannot_fuse():
    class Wrapper:  # megatron-core's shape: chained optimizers, each holding a torch one in .optimizer
        def __init__(self, *inner):
            self.chained_optimizers = [type("Sub", (), {"optimizer": o})() for o in inner]

    ints = torch.optim.SGD([torch.nn.Parameter(torch.randn(3))], lr=0.1)
    adam = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))], lr=0.1)
    assert use_fused_adam(Wrapper(ints, adam)) == 1
    assert "fused" not in ints.param_groups[0] or not ints.param_groups[0]["fused"]
    assert adam.param_groups[0]["fused"]
