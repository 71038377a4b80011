"""Optimizer-state details of the training path that CPU can check without megatron-core's GPU optimizer."""

from __future__ import annotations

import copy

import torch

from megatron_lasp.training.optim import unshare_adam_steps


def _adam(params):
    return torch.optim.AdamW(params, lr=1e-2, foreach=True)


def _shared_step_copy(opt, params):
    """What megatron-core's DistributedOptimizer.load_state_dict leaves: one step tensor for all."""
    shared = opt.state[params[0]]["step"]
    for p in params[1:]:
        opt.state[p]["step"] = shared


def _train(opt, params, steps):
    for _ in range(steps):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()


def test_unshare_adam_steps_restores_per_parameter_steps():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
    opt = _adam(params)
    _train(opt, params, 2)
    reference = [p.detach().clone() for p in params]
    ref_opt = copy.deepcopy(opt)

    # the bug: with one shared step tensor, multi-tensor Adam advances it once per parameter
    shared = [torch.nn.Parameter(p.detach().clone()) for p in params]
    bad = _adam(shared)
    bad.load_state_dict(copy.deepcopy(opt.state_dict()))
    _shared_step_copy(bad, shared)
    _train(bad, shared, 1)
    assert float(bad.state[shared[0]]["step"]) == 2 + len(shared)

    fixed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    good = _adam(fixed)
    good.load_state_dict(copy.deepcopy(opt.state_dict()))
    _shared_step_copy(good, fixed)
    assert unshare_adam_steps(good) == len(fixed) - 1
    assert unshare_adam_steps(good) == 0
    _train(good, fixed, 1)

    ref_params = [p for g in ref_opt.param_groups for p in g["params"]]
    _train(ref_opt, ref_params, 1)
    for p, want in zip(fixed, ref_params):
        assert float(good.state[p]["step"]) == 3.0
        assert torch.equal(p, want)
    assert not all(torch.equal(p, q) for p, q in zip(fixed, reference))
