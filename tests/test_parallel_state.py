"""Parallel state on megatron-core (gloo ranks): group layouts, contiguous split/gather, bad sizes."""

import itertools

import pytest
import torch
import torch.distributed as dist

from megatron_lasp.parallel import (
    gather_sequence,
    initialize_parallel,
    sequence_slice_bounds,
    split_sequence,
    validate_parallel_sizes,
)
from megatron_lasp.testing import spawn


def _expected_groups(world, tp, sp, pp):
    """Group members from megatron-core's documented order ``tp-cp-ep-dp-pp`` (tp fastest)."""
    dp = world // (tp * sp * pp)
    coords = {}
    for rank in range(world):
        r = rank
        t, r = r % tp, r // tp
        s, r = r % sp, r // sp
        d, p = r % dp, r // dp
        coords[rank] = (t, s, d, p)

    def members(rank, vary):
        own = coords[rank]
        return sorted(
            other
            for other, c in coords.items()
            if all(c[i] == own[i] for i in range(4) if i not in vary)
        )

    return {
        rank: dict(
            tp=members(rank, {0}),
            cp=members(rank, {1}),
            dp=members(rank, {2}),
            dp_cp=members(rank, {1, 2}),
            pp=members(rank, {3}),
        )
        for rank in range(world)
    }


def _layouts(world):
    out = []
    for tp, sp, pp in itertools.product([1, 2, 4], repeat=3):
        if tp * sp * pp <= world and world % (tp * sp * pp) == 0:
            out.append((tp, sp, pp))
    return out


def _check_layouts(rank, world_size):
    for tp, sp, pp in _layouts(world_size):
        groups = initialize_parallel(tp, sp, pp, seed=1234)
        expected = _expected_groups(world_size, tp, sp, pp)[rank]
        for name, want in expected.items():
            got = sorted(dist.get_process_group_ranks(getattr(groups, name)))
            assert got == want, f"TP{tp} SP{sp} PP{pp}: {name} group of rank {rank} is {got}, expected {want}"
        assert (groups.tp.size(), groups.cp.size(), groups.pp.size()) == (tp, sp, pp)
        assert groups.dp.size() == world_size // (tp * sp * pp)
        # the SP group really communicates among its members
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=groups.cp)
        assert t.item() == sum(expected["cp"])
        _check_rng_tracker(1234, groups.tp.rank())
    return len(_layouts(world_size))


def _check_rng_tracker(seed, tp_rank):
    """megatron-core's seeding with the CPU tracker: CPU generators under its names and seed offsets."""
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel import random as mpu_random

    ep_rank, etp_rank = mpu.get_expert_model_parallel_rank(), mpu.get_expert_tensor_parallel_rank()
    tracker = mpu_random.get_cuda_rng_tracker()
    assert isinstance(tracker, mpu_random.CudaRNGStatesTracker) and type(tracker).__name__ == "CPURNGStatesTracker"
    assert mpu_random.CudaRNGStatesTracker.__name__ == "CudaRNGStatesTracker", "the tracker class swap leaked"
    want = {
        mpu_random._DATA_PARALLEL_RNG_TRACKER_NAME: seed,
        mpu_random._MODEL_PARALLEL_RNG_TRACKER_NAME: seed + 2718 + tp_rank,
        mpu_random._EXPERT_PARALLEL_RNG_TRACKER_NAME: seed + 1024 + 100 * ep_rank + etp_rank,
    }
    states = tracker.get_states()
    assert set(states) == set(want)
    for name, s in want.items():
        assert torch.equal(states[name], torch.Generator().manual_seed(s).get_state()), name
    # fork draws from the tracked state and leaves the default generator alone
    outer = torch.get_rng_state()
    with tracker.fork():
        x = torch.rand(3)
    assert torch.equal(x, torch.rand(3, generator=torch.Generator().manual_seed(seed + 2718 + tp_rank)))
    assert torch.equal(torch.get_rng_state(), outer)


def _check_platform_scope(rank, world_size):
    """The CPU layer lives from initialize_parallel to destroy_parallel, no longer."""
    from megatron_lasp.parallel import destroy_parallel

    original = (torch.cuda.current_device, torch.cuda.synchronize)
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()
    initialize_parallel(1, world_size, 1, seed=3)
    assert torch.cuda.current_device() == torch.device("cpu")
    initialize_parallel(1, 1, 1)  # a second initialisation keeps the one layer
    destroy_parallel()
    assert (torch.cuda.current_device, torch.cuda.synchronize) == original
    return True


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU platform layer is inactive with CUDA")
def test_cpu_platform_scoped_to_parallel_state():
    assert all(spawn(_check_platform_scope, 2, init_process_group=False))


@pytest.mark.parametrize("world_size", [1, 2, 4], ids=lambda w: f"world{w}")
def test_group_layouts(world_size):
    counts = spawn(_check_layouts, world_size)
    assert counts == [len(_layouts(world_size))] * world_size


def _check_split_gather(rank, world_size):
    groups = initialize_parallel(1, world_size, 1)
    torch.manual_seed(0)  # the same full tensors on every rank
    x = torch.randn(3, 8 * world_size, 5, requires_grad=True)
    mine = split_sequence(x, groups.cp, dim=1)
    start, end = sequence_slice_bounds(x.size(1), rank, world_size)
    assert torch.equal(mine, x[:, start:end]), "split is not this rank's contiguous slice"
    back = gather_sequence(mine, groups.cp, dim=1)
    assert torch.equal(back, x), "gather(split(x)) != x"
    # gradient of the identity round trip is the identity
    w = torch.randn_like(x)
    (back * w).sum().backward()
    assert torch.equal(x.grad, w * 1.0)
    # megatron layout [S, B, H]
    y = torch.randn(4 * world_size, 2, 3)
    assert torch.equal(gather_sequence(split_sequence(y, groups.cp, dim=0), groups.cp, dim=0), y)
    with pytest.raises(ValueError, match="must be divisible by the sequence-parallel size"):
        split_sequence(torch.randn(1, 4 * world_size + 1, 2), groups.cp)
    return True


@pytest.mark.parametrize("world_size", [2, 4], ids=lambda w: f"sp{w}")
def test_contiguous_split_gather(world_size):
    assert all(spawn(_check_split_gather, world_size))


def test_slice_bounds():
    assert [sequence_slice_bounds(12, r, 3) for r in range(3)] == [(0, 4), (4, 8), (8, 12)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(world_size=4, tensor_model_parallel_size=3), "not divisible by tensor_model_parallel_size"),
        (dict(world_size=2, sequence_parallel_size=4), "sequence_parallel_size"),
        (dict(world_size=4, pipeline_model_parallel_size=0), "pipeline_model_parallel_size must be a positive"),
    ],
    ids=["tp-not-dividing", "sp-too-large", "pp-zero"],
)
def test_bad_sizes_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        validate_parallel_sizes(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_attention_heads=3, tensor_model_parallel_size=2), "num_attention_heads"),
        (dict(num_attention_heads=6, context_parallel_size=4, sequence_parallel_mode="ulysses"),
         "ulysses needs the heads"),
        (dict(sequence_parallel_mode="ring"), "sequence_parallel_mode must be one of"),
    ],
    ids=["heads-tp", "heads-ulysses", "unknown-mode"],
)
def test_bad_head_split_rejected_by_the_config(kwargs, message):
    """How the heads split over the groups is the model config's rule (check_head_split)."""
    from megatron_lasp.models import linear_lm_config

    with pytest.raises(ValueError, match=message):
        linear_lm_config("tiny", **kwargs)


def test_seq_length_must_split_over_the_sp_group():
    from megatron_lasp.parallel.layout import check_sequence_split

    with pytest.raises(ValueError, match=r"seq_length \(7\) must be divisible by the sequence-parallel size \(2\)"):
        check_sequence_split(7, 2, "seq_length")
    check_sequence_split(8, 2, "seq_length")


def test_good_sizes_give_data_parallel_size():
    from megatron_lasp.models.config import check_head_split
    from megatron_lasp.parallel.layout import check_sequence_split

    assert validate_parallel_sizes(8, 2, 2, 1) == 2
    assert check_head_split(4, 2, 2) == 2
    check_sequence_split(64, 2)
    assert validate_parallel_sizes(4, 1, 4, 1) == 1
    assert check_head_split(8, 1, 4, "ulysses") == 8


def _bad_world(rank, world_size):
    with pytest.raises(ValueError, match="world size 2 is not divisible"):
        initialize_parallel(tensor_model_parallel_size=4)
    return True


def test_initialize_rejects_bad_world():
    assert all(spawn(_bad_world, 2))


def test_local_device_shares_gpus_under_gloo_only():
    from megatron_lasp.parallel.state import local_device

    assert [local_device("gloo", r, 1) for r in range(4)] == [0, 0, 0, 0]
    assert [local_device("gloo", r, 2, 4) for r in range(4)] == [0, 1, 0, 1]
    assert [local_device("nccl", r, 2, 2) for r in range(2)] == [0, 1]
    assert local_device("gloo", 3, 0) is None and local_device("nccl", 0, 0) is None
    for args in (("nccl", 0, 1, 2), ("nccl", 1, 1)):
        with pytest.raises(ValueError, match="2 processes on this node but 1 visible GPU.*--distributed-backend gloo"):
            local_device(*args)


@pytest.mark.parametrize("backend", [None, "nccl", "gloo"])
def test_more_ranks_than_gpus_needs_gloo(backend, monkeypatch):
    """On a (faked) one-GPU node with 2 local ranks, NCCL (the default there) is a one-line flag
    error that names the gloo backend; gloo passes."""
    from megatron_lasp.training import arguments

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("MEGATRON_LASP_DIST_BACKEND", raising=False)
    argv = ["--model-preset", "tiny", "--mock-data", "--seq-length", "64", "--train-iters", "1"]
    argv += ["--distributed-backend", backend] if backend else []
    if backend == "gloo":
        arguments.parse_config(argv)
        return
    with pytest.raises(arguments.ArgumentError, match="2 processes on this node but 1 visible GPU") as err:
        arguments.parse_config(argv)
    assert "\n" not in str(err.value)


def _uncoalesced(rank, world_size):
    """megatron-core's reduce-scatter / all-gather pattern through its coalescing manager, the real
    one and the one-by-one replacement (what gloo + CUDA gets): the same results."""
    from megatron.core.distributed import param_and_grad_buffer as buffers

    from megatron_lasp.parallel.comm import uncoalesced_gloo_collectives

    def pattern():
        grads = [torch.arange(8.0) * (rank + 1) + b for b in range(3)]  # one bucket each
        shards = [torch.empty(8 // world_size) for _ in grads]
        with buffers._coalescing_manager(None, async_ops=False) as cm:
            for out, inp in zip(shards, grads):
                dist.reduce_scatter_tensor(out, inp)
        cm.wait()
        params = [torch.empty(8) for _ in shards]
        with buffers._coalescing_manager(None, async_ops=False):
            for out, inp in zip(params, shards):
                dist.all_gather_into_tensor(out, inp)
        return torch.stack(params)

    real = buffers._coalescing_manager
    coalesced = pattern()
    with uncoalesced_gloo_collectives():
        replaced = buffers._coalescing_manager is not real
        one_by_one = pattern()
        with pytest.raises(RuntimeError, match="overlap_grad_reduce"):
            buffers._coalescing_manager(None, async_ops=True)
    restored = buffers._coalescing_manager is real
    return coalesced.tolist(), one_by_one.tolist(), replaced, restored


def test_data_parallel_collectives_uncoalesced_on_gloo():
    """The replacement megatron-core's DDP uses when ranks share a GPU over gloo (gloo's coalesced
    collectives crash on CUDA tensors) computes what the coalesced collectives compute."""
    for coalesced, one_by_one, replaced, restored in spawn(_uncoalesced, 2, ()):
        want = (sum(torch.arange(8.0) * (r + 1) for r in range(2))[None] + torch.arange(3.0)[:, None] * 2).tolist()
        assert coalesced == want and one_by_one == want
        assert replaced and restored
