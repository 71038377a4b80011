"""The sequence-parallel modes (lasp, lasp2, ulysses, allgather) against the single-process kernel.

Every check shards one random sequence over the group, runs ``lightning_attn_sp`` forward and
backward on gloo ranks, gathers the output and dq, dk, dv and compares them with the torch
kernel run on the whole sequence in fp64 (relative error of the fp32 run < 1e-5). Checks are
grouped per spawn because starting ranks dominates the cost.
"""

import random

import pytest
import torch
import torch.distributed as dist

from megatron_lasp.ops.lightning_attn import TritonOptions, chunk_lightning_attn
from megatron_lasp.parallel import gather_sequence, initialize_parallel, lightning_attn_sp, split_sequence
from megatron_lasp.parallel import lasp as lasp_module
from megatron_lasp.parallel import hop as hop_module
from megatron_lasp.testing import attention_inputs, check_slopes, rel_err, spawn

MODES = ("lasp", "lasp2", "ulysses", "allgather")
TOL = 1e-5
POISON = TritonOptions(poison_outputs=True)  # NaN-filled triton kernel buffers (ignored by torch)


def _slopes(H: int, decay: bool) -> torch.Tensor:
    # ALiBi-like spread plus one strong head whose lam^C underflows to 0 in fp32
    return check_slopes(H, strong_head=True) if decay else torch.zeros(H)


_rel = rel_err
_full_inputs = attention_inputs


def _reference(q, k, v, do, slopes):
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o, _ = chunk_lightning_attn(*leaves, slopes.double(), backend="torch")
    o.backward(do)
    return o.detach(), [x.grad for x in leaves]


def _compare(seed, shape, decay, mode, group, backend="torch"):
    """Run one case on this rank; return {name: relative error} of the gathered results."""
    B, T, H, Dk, Dv = shape
    slopes = _slopes(H, decay)
    q, k, v, do = _full_inputs(seed, B, T, H, Dk, Dv)
    o_ref, grads_ref = _reference(q, k, v, do, slopes)
    local = [split_sequence(x.float(), group).requires_grad_(True) for x in (q, k, v)]
    o = lightning_attn_sp(*local, slopes, group, mode=mode, backend=backend, triton_options=POISON)
    assert o.shape == local[2].shape and o.dtype == torch.float32
    o.backward(split_sequence(do.float(), group))
    got = [gather_sequence(o.detach(), group)] + [gather_sequence(x.grad, group) for x in local]
    return {name: _rel(a, b) for name, a, b in zip(("o", "dq", "dk", "dv"), got, [o_ref] + grads_ref)}


def _assert_all_close(results, what):
    bad = {case: errs for case, errs in results.items() if not all(e < TOL for e in errs.values())}
    assert not bad, f"{what}: relative errors >= {TOL}: {bad}"


def _cases(world):
    # local lengths: not a multiple of the torch kernel's 64-token block, shorter and longer than it
    shapes = [(2, 37 * world, 4, 16, 8), (1, 100 * world, 4, 8, 16)]
    return [(shape, decay, mode) for shape in shapes for decay in (True, False) for mode in MODES]


def _case_id(shape, decay, mode, world):
    B, T, H, Dk, Dv = shape
    return f"{mode}-B{B}-T{T}-H{H}-Dk{Dk}-Dv{Dv}-sp{world}-{'decay' if decay else 'nodecay'}"


def _check_world(rank, world_size, seed):
    """Every mode over the world group, plus groups of one rank and None."""
    group = dist.group.WORLD
    results = {_case_id(*case, world_size): _compare(seed + i, *case, group) for i, case in enumerate(_cases(world_size))}
    singles = [dist.new_group([r]) for r in range(world_size)]
    for mode in MODES:
        case = ((2, 45, 4, 8, 8), True, mode)
        results[_case_id(*case, 1)] = _compare(seed + 100, *case, singles[rank])
        results[_case_id(*case, 0) + "-groupNone"] = _compare(seed + 100, *case, None)
    return results


def _check_strided(rank, seed):
    """TP=2 x SP=2 on 4 ranks: the SP groups are {0, 2} and {1, 3} (strided in global rank)."""
    groups = initialize_parallel(2, 2, 1)
    members = dist.get_process_group_ranks(groups.cp)
    assert members == [rank % 2, rank % 2 + 2], members
    # the two SP groups run different sequences: a peer from the wrong group would mix them
    return {
        _case_id(shape, decay, mode, 2) + "-tp2": _compare(seed + 7 * (rank % 2) + i, shape, decay, mode, groups.cp)
        for i, (shape, decay, mode) in enumerate(_cases(2)[:8])
    }


def _check_layers_and_order(world_size, seed):
    """Several LASP layers in a row (state traffic in both directions between the same pair), and
    the schedule: the receive is posted before the local kernel, the state-only pass comes first,
    the state is sent on right after the wait, and the output pass runs after the send."""
    group = dist.group.WORLD
    B, T, H, D = 2, 30 * world_size, 2, 8
    slopes = _slopes(H, True)
    q, k, v, do = _full_inputs(seed, B, T, H, D, D)
    weights = [torch.randn(D, D, generator=torch.Generator().manual_seed(seed + i), dtype=torch.float64) for i in range(3)]

    def model(x, attn):
        for w in weights:
            xw = x @ w.to(x.dtype) * D ** -0.5
            x = x + attn(xw, xw, x)
        return x

    def ref_attn(a, b, c):
        return chunk_lightning_attn(a, b, c, slopes.double(), backend="torch")[0]

    x_ref = q.clone().requires_grad_(True)
    model(x_ref, ref_attn).backward(do)

    events = []
    names = ("_post_recv", "_post_send", "lightning_attn_fwd_phases", "lightning_attn_bwd_phases")
    owner = {name: hop_module if name.startswith("_post") else lasp_module for name in names}
    real = {name: getattr(owner[name], name) for name in names}

    class _Work:
        def __init__(self, work):
            self.work = work

        def wait(self):
            events.append("wait")
            return self.work.wait()

    def post(*args):
        buf, work = real["_post_recv"](*args)
        if work is not None:
            events.append("post")
            work = _Work(work)
        return buf, work

    def send(*args):
        if args[1] is not None:
            events.append("send")
        return real["_post_send"](*args)

    def phases(name, tag):
        def run(*args, **kwargs):
            events.append("state" + tag)
            first, finish = real[name](*args, **kwargs)

            def traced_finish():
                events.append("output" + tag)
                return finish()

            return first, traced_finish

        return run

    fakes = dict(_post_recv=post, _post_send=send, lightning_attn_fwd_phases=phases("lightning_attn_fwd_phases", ""),
                 lightning_attn_bwd_phases=phases("lightning_attn_bwd_phases", "_bwd"))
    for name, fn in fakes.items():
        setattr(owner[name], name, fn)
    try:
        x = split_sequence(q.float(), group).requires_grad_(True)
        y = model(x, lambda a, b, c: lightning_attn_sp(a, b, c, slopes, group, mode="lasp"))
        y.backward(split_sequence(do.float(), group))
    finally:
        for name, fn in real.items():
            setattr(owner[name], name, fn)
    err = _rel(gather_sequence(x.grad, group), x_ref.grad)
    return err, events


def _check_bidirectional(rank):
    """Both ranks of a pair receive from and send to each other at once (gloo must not deadlock)."""
    peer = 1 - rank
    ok = []
    for numel in (16, 1 << 20):  # a small and a 4 MiB state
        mine = torch.full((numel,), float(rank + 1))
        buf, recv = hop_module._post_recv((numel,), torch.float32, mine.device, peer, dist.group.WORLD)
        send = hop_module._post_send(mine, peer, dist.group.WORLD)
        recv.wait()
        send.wait()
        ok.append(bool((buf == peer + 1).all()))
    return ok


def _check_staged(rank, seed):
    """The point-to-point of states through a host buffer (what a gloo group does with CUDA tensors,
    ranks sharing a GPU), forced on here: the LASP ring gives the same results, and a pair sends
    both ways at once."""
    from megatron_lasp.parallel import comm

    real = comm.staged_p2p
    comm.staged_p2p = lambda x, group: True
    try:
        shape = (2, 74, 4, 16, 8)
        errs = {f"lasp-staged-{i}": _compare(seed + i, shape, decay, "lasp", dist.group.WORLD)
                for i, decay in enumerate((True, False))}
        peer = 1 - rank
        mine = torch.full((3, 5), float(rank + 1))
        buf = torch.full((3, 5), float("nan"))
        recv = comm.recv_state(buf, peer, dist.group.WORLD)
        assert torch.isnan(buf).all()  # staged: nothing lands in ``buf`` before wait()
        send = comm.send_state(mine, peer, dist.group.WORLD)
        recv.wait()
        send.wait()
        errs["pair"] = {"recv": float((buf - (peer + 1)).abs().max())}
        # megatron-core's pipeline hook: rank 0 exchanges with its next stage, rank 1 with its previous
        got = torch.full((4, 2), float("nan"))
        sent = torch.full((4, 2), 10.0 + rank)
        kw = (dict(tensor_send_next=sent, tensor_recv_next=got) if rank == 0 else
              dict(tensor_send_prev=sent, tensor_recv_prev=got))
        comm.ring_exchange(group=dist.group.WORLD, prev_pipeline_rank=peer, next_pipeline_rank=peer, **kw)
        errs["ring_exchange"] = {"recv": float((got - (10 + peer)).abs().max())}
    finally:
        comm.staged_p2p = real
    return errs


def _expect_error(fn, *needles):
    try:
        fn()
    except ValueError as e:
        msg = str(e)
        missing = [n for n in needles if n not in msg]
        assert not missing, f"error message {msg!r} lacks {missing}"
        return msg
    raise AssertionError(f"no ValueError (expected one mentioning {needles})")


def _check_bad_inputs(rank):
    group = dist.group.WORLD
    slopes = _slopes(4, True)

    def x(T=8, H=4, D=8, dtype=torch.float32):
        return torch.randn(2, T, H, D, dtype=dtype)

    # a rank with another local length, dtype or mode: every rank raises, none hangs
    T = 8 if rank == 0 else 9
    _expect_error(lambda: lightning_attn_sp(x(T), x(T), x(T), slopes, group), "disagree", "T_local=9")
    dt = torch.float32 if rank == 0 else torch.float64
    _expect_error(lambda: lightning_attn_sp(x(dtype=dt), x(dtype=dt), x(dtype=dt), slopes, group), "disagree", "dtype")
    mode = "lasp" if rank == 0 else "lasp2"
    _expect_error(lambda: lightning_attn_sp(x(), x(), x(), slopes, group, mode=mode), "disagree", "mode=lasp2")
    # heads not divisible by the group size under ulysses
    _expect_error(
        lambda: lightning_attn_sp(x(H=3), x(H=3), x(H=3), _slopes(3, True), group, mode="ulysses"),
        "ulysses", "heads of q (3) must be divisible by the sequence-parallel group size (2)",
    )
    # the group still works after the errors
    o = lightning_attn_sp(x(), x(), x(), slopes, group, mode="lasp2")
    return bool(torch.isfinite(o).all())


@pytest.mark.parametrize(
    "case, needles",
    [
        (dict(mode="ring"), ("unknown mode", "mode must be one of lasp, lasp2, ulysses, allgather")),
        (dict(q=torch.zeros(2, 8, 4, 8, dtype=torch.int32)), ("dtype",)),
        (dict(v=torch.zeros(2, 8, 4, 8, dtype=torch.float64)), ("share one dtype",)),
        (dict(slopes=torch.zeros(5)), ("slopes",)),
        (dict(slopes=torch.zeros(4, requires_grad=True)), ("require grad",)),
        (dict(k=torch.zeros(2, 9, 4, 8)), ("k must have q's shape",)),
        (dict(q=torch.zeros(8, 4, 8)), ("4-d",)),
        (dict(backend="cuda"), ("unknown backend",)),
        (dict(slopes=None), ("either slopes", "or g")),
        (dict(g=torch.zeros(2, 8, 4)), ("not both",)),
        (dict(slopes=None, g=torch.zeros(2, 8, 3)), ("g must be a float tensor [B, T, H]",)),
    ],
    ids=["mode", "int-dtype", "mixed-dtype", "slopes-shape", "slopes-grad", "k-shape", "q-3d", "backend",
         "no-decay", "slopes-and-g", "g-shape"],
)
def test_bad_inputs_local(case, needles):
    args = dict(q=torch.zeros(2, 8, 4, 8), k=torch.zeros(2, 8, 4, 8), v=torch.zeros(2, 8, 4, 8),
                slopes=torch.zeros(4), group=None, mode="lasp", backend=None)
    args.update(case)
    _expect_error(lambda: lightning_attn_sp(**args), *needles)


def _check_triton(seed):
    """The triton backend in Triton's interpreter through every mode (NaN-poisoned kernel buffers)."""
    shape = (1, 80, 2, 16, 16)  # 40 tokens per rank: several 16-token blocks and 32-token segments
    return {
        _case_id(shape, True, mode, 2) + "-triton": _compare(seed + i, shape, True, mode, dist.group.WORLD, "triton")
        for i, mode in enumerate(MODES)
    }


def _two_ranks(rank, world_size, seed):
    torch.set_num_threads(1)
    return dict(
        world=_check_world(rank, world_size, seed),
        layers=_check_layers_and_order(world_size, seed + 1000),
        bidirectional=_check_bidirectional(rank),
        bad_inputs=_check_bad_inputs(rank),
        triton=_check_triton(seed + 2000),
        staged=_check_staged(rank, seed + 3000),
    )


def _four_ranks(rank, world_size, seed):
    torch.set_num_threads(1)
    return dict(world=_check_world(rank, world_size, seed), strided=_check_strided(rank, seed + 1000))


@pytest.fixture(scope="module")
def two_ranks():
    seed = random.randrange(1 << 30)
    return seed, spawn(_two_ranks, 2, args=(seed,), env={"TRITON_INTERPRET": "1"}, timeout=600)


@pytest.fixture(scope="module")
def four_ranks():
    seed = random.randrange(1 << 30)
    return seed, spawn(_four_ranks, 4, args=(seed,), timeout=600)


def test_all_modes_two_ranks(two_ranks):
    seed, results = two_ranks
    for rank_results in results:
        _assert_all_close(rank_results["world"], f"2 ranks, seed {seed}")
    assert len(results[0]["world"]) == len(_cases(2)) + 2 * len(MODES)


def test_all_modes_four_ranks(four_ranks):
    seed, results = four_ranks
    for rank_results in results:
        _assert_all_close(rank_results["world"], f"4 ranks, seed {seed}")


def test_strided_tp2_sp2(four_ranks):
    seed, results = four_ranks
    for rank_results in results:
        _assert_all_close(rank_results["strided"], f"TP2 x SP2, seed {seed}")
        assert len(rank_results["strided"]) == 8


def test_lasp_layers_and_overlap_order(two_ranks):
    seed, results = two_ranks
    for rank, rank_results in enumerate(results):
        err, events = rank_results["layers"]
        assert err < TOL, f"rank {rank}: 3-layer LASP gradient error {err} (seed {seed})"
        # the receive is posted before the local kernel and waited on after its state-only pass;
        # the state goes on right after the wait, before the output pass. Rank 1 receives in the
        # forward and sends in the backward, rank 0 the other way round.
        if rank == 1:
            assert events == (["post", "state", "wait", "output"] * 3
                              + ["state_bwd", "send", "output_bwd"] * 3), events
        else:
            assert events == (["state", "send", "output"] * 3
                              + ["post", "state_bwd", "wait", "output_bwd"] * 3), events


def test_simultaneous_send_recv_between_a_pair(two_ranks):
    _, results = two_ranks
    assert [r["bidirectional"] for r in results] == [[True, True], [True, True]]


def test_lasp_ring_staged_through_host_memory(two_ranks):
    seed, results = two_ranks
    for rank_results in results:
        _assert_all_close(rank_results["staged"], f"staged point-to-point, seed {seed}")
        assert len(rank_results["staged"]) == 4


def test_bad_inputs_across_ranks(two_ranks):
    _, results = two_ranks
    assert [r["bad_inputs"] for r in results] == [True, True]


def test_triton_interpreter_two_ranks(two_ranks):
    seed, results = two_ranks
    for rank_results in results:
        _assert_all_close(rank_results["triton"], f"triton interpreter, seed {seed}")
        assert len(rank_results["triton"]) == len(MODES)
