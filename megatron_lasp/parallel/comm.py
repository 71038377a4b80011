"""Communication of the sequence-parallel modes: the group and its peers, the state dtype, the
collectives, and the point-to-point of states.

Point-to-point (:func:`send_state`, :func:`recv_state`): the one way the package sends a state
from rank to rank. gloo cannot send or receive CUDA tensors ("Bad address"), while its
collectives accept them; so on a gloo group a CUDA tensor goes through a pinned host buffer, which
lets several ranks share one GPU (``--distributed-backend gloo``) as a correctness check. On NCCL,
and for CPU tensors, they are plain ``isend`` / ``irecv``. megatron-core's pipeline stages take
the same route through :func:`ring_exchange` (:func:`pipeline_ring_exchange`).

Coalesced collectives: megatron-core's gradient reduce-scatter and parameter all-gather run inside
``torch.distributed._coalescing_manager``, which hands a gloo group its ``*_coalesced`` forms;
with CUDA tensors those crash the process (SIGSEGV in the first step), while the plain forms work.
:func:`uncoalesced_gloo_collectives` makes them run one by one on gloo groups.

What a slice does to a state (decay factors, documents, the per-slice transform, the modes'
autograd tail) is :mod:`megatron_lasp.parallel.slices`; the LASP hop is :mod:`megatron_lasp.parallel.hop`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
import torch.distributed as dist


__all__ = [
    "GroupInfo",
    "group_info",
    "state_dtype",
    "all_gather_flat",
    "gather_rows",
    "reduce_scatter_flat",
    "from_last_rank",
    "sum_over_group",
    "send_state",
    "recv_state",
    "staged_p2p",
    "ring_exchange",
    "pipeline_ring_exchange",
    "uncoalesced_gloo_collectives",
]


@dataclasses.dataclass(frozen=True)
class GroupInfo:
    """This rank's place in a sequence-parallel group."""

    group: dist.ProcessGroup
    """The group itself."""
    rank: int
    """Rank inside the group (= index of this rank's slice)."""
    size: int
    """Number of ranks (slices)."""
    prev: Optional[int]
    """Global rank holding the slice before this one, None on the first rank."""
    next: Optional[int]
    """Global rank holding the slice after this one, None on the last rank."""


def group_info(group: dist.ProcessGroup) -> GroupInfo:
    """Rank, size and neighbours of this rank in ``group``.

    Neighbours are global ranks taken from the group's own order, so strided groups (TP > 1) work.
    """
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    prev = dist.get_global_rank(group, rank - 1) if rank > 0 else None
    nxt = dist.get_global_rank(group, rank + 1) if rank < size - 1 else None
    return GroupInfo(group, rank, size, prev, nxt)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and their gradients are fp32 whatever the activations (fp64 for fp64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gather_rows(values, group: dist.ProcessGroup, device: torch.device) -> list:
    """Every rank's ``values`` (a list of ints, the same length on every rank) in group order, with
    one small all-gather on ``device`` (the CPU unless it is a GPU): how the entry points check
    that the ranks agree on their inputs."""
    device = device if device.type == "cuda" else torch.device("cpu")
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    out = torch.empty(dist.get_world_size(group) * mine.numel(), dtype=torch.int64, device=device)
    all_gather_flat(out, mine, group)
    return out.view(-1, mine.numel()).tolist()


def all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup) -> None:
    """All-gather of 1-d ``inp`` into 1-d ``out`` (``W`` times longer), in group order.

    Uses ``all_gather_single`` where torch has it (``all_gather_into_tensor`` is deprecated there).
    """
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def reduce_scatter_flat(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup) -> None:
    """Sum-reduce-scatter of 1-d ``inp`` (``W`` equal parts, in group order) into 1-d ``out``."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, group=group)


def from_last_rank(x: Optional[torch.Tensor], like: torch.Tensor, info: GroupInfo) -> torch.Tensor:
    """The last rank's ``x`` on every rank (``x`` is read on the last rank only; ``like`` gives the
    shape and dtype elsewhere): one all-reduce, the others adding exact zeros (gloo's broadcast is
    not among the collectives known to take CUDA tensors)."""
    dense = torch.contiguous_format  # all_reduce takes contiguous tensors
    out = x.clone(memory_format=dense) if info.rank == info.size - 1 else torch.zeros_like(like, memory_format=dense)
    dist.all_reduce(out, group=info.group)
    return out


def sum_over_group(x: torch.Tensor, info: GroupInfo) -> torch.Tensor:
    """The sum of every rank's ``x`` (a new contiguous tensor: a gradient handed back by autograd
    may have any strides), with one all-reduce."""
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=info.group)
    return out


# ----------------------------------------------------------------------------------------------
# point-to-point of states


def staged_p2p(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> bool:
    """Whether a send / receive of ``x`` on ``group`` must go through host memory: a CUDA tensor on
    a gloo group (gloo's point-to-point takes host tensors only)."""
    return x.is_cuda and dist.get_backend(group) == "gloo"


def _host_buffer(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=like.is_cuda)


class _StagedWork:
    """The work of a staged send / receive: ``wait()`` waits for the host transfer and, for a
    receive, copies the host buffer into the device tensor on the current stream."""

    def __init__(self, work: dist.Work, host: torch.Tensor, out: Optional[torch.Tensor]):
        self._work, self._host, self._out = work, host, out

    def wait(self) -> bool:
        if self._work is not None:
            self._work.wait()
            self._work = None
            if self._out is not None:
                with torch.no_grad():  # megatron-core receives into leaves that require grad
                    self._out.copy_(self._host)  # blocking: the host buffer may go right after
        return True

    def is_completed(self) -> bool:
        return self._work is None or self._work.is_completed()


def send_state(x: torch.Tensor, dst: int, group: Optional[dist.ProcessGroup], *,
               staged: Optional[bool] = None):
    """Start sending ``x`` to global rank ``dst`` of ``group``; returns the work (``wait()``).

    Args:
        x: the tensor (any shape; sent contiguous).
        dst: the receiver's global rank.
        group: the process group both ranks belong to.
        staged: go through a host buffer (pinned for CUDA tensors); default :func:`staged_p2p`.
            A staged send copies ``x`` to the host before returning (that copy waits for the work
            queued on the current stream that produces ``x``).
    """
    x = x.contiguous()
    if not (staged_p2p(x, group) if staged is None else staged):
        return dist.isend(x, dst=dst, group=group)
    host = _host_buffer(x)
    with torch.no_grad():
        host.copy_(x)
    return _StagedWork(dist.isend(host, dst=dst, group=group), host, None)


def recv_state(out: torch.Tensor, src: int, group: Optional[dist.ProcessGroup], *,
               staged: Optional[bool] = None):
    """Start receiving into ``out`` from global rank ``src`` of ``group``; returns the work.

    ``out`` holds the received values once ``wait()`` has returned (staged: the copy from the host
    buffer runs inside ``wait()``, on the stream current there).

    Args:
        out: a contiguous tensor of the sent shape and dtype.
        src: the sender's global rank.
        group: the process group both ranks belong to.
        staged: as in :func:`send_state`.
    """
    assert out.is_contiguous(), "recv_state: out must be contiguous"
    if not (staged_p2p(out, group) if staged is None else staged):
        return dist.irecv(out, src=src, group=group)
    host = _host_buffer(out)
    return _StagedWork(dist.irecv(host, src=src, group=group), host, out)


def ring_exchange(*, tensor_send_prev=None, tensor_recv_prev=None, tensor_send_next=None, tensor_recv_next=None,
                  group=None, prev_pipeline_rank=None, next_pipeline_rank=None) -> None:
    """megatron-core's pipeline exchange (``torch.distributed.ring_exchange``, what its
    ``use_ring_exchange_p2p`` calls) through :func:`send_state` / :func:`recv_state`: posts every
    receive, then every send, and returns when all are done (the ranks are global ranks)."""
    works = []
    for out, src in ((tensor_recv_prev, prev_pipeline_rank), (tensor_recv_next, next_pipeline_rank)):
        if out is not None:
            works.append(recv_state(out, src, group))
    for x, dst in ((tensor_send_prev, prev_pipeline_rank), (tensor_send_next, next_pipeline_rank)):
        if x is not None:
            works.append(send_state(x, dst, group))
    for work in works:
        work.wait()


@contextlib.contextmanager
def pipeline_ring_exchange():
    """Provide ``torch.distributed.ring_exchange`` (:func:`ring_exchange`) inside the context, for
    megatron-core's pipeline schedules with ``config.use_ring_exchange_p2p`` (its hook for a custom
    point-to-point): on a gloo group with CUDA tensors its own ``isend`` / ``irecv`` fail."""
    had = hasattr(dist, "ring_exchange")
    previous = getattr(dist, "ring_exchange", None)
    dist.ring_exchange = ring_exchange
    try:
        yield
    finally:
        if had:
            dist.ring_exchange = previous
        else:
            del dist.ring_exchange


class _RanOneByOne:
    """What megatron-core keeps of a coalescing manager when the collectives inside it already ran
    one by one, synchronously: ``wait()`` has nothing left to wait for."""

    def wait(self) -> None:
        return None


def _coalescing_unless_gloo(real):
    def manager(group=None, device=None, async_ops=False):
        if dist.get_backend(group) != "gloo":
            return real(group, device, async_ops)
        if async_ops:
            # the collectives inside would be asynchronous with no handle left to wait on
            raise RuntimeError("gloo with CUDA tensors runs megatron-core's gradient and parameter collectives "
                               "one by one and synchronously: turn off overlap_grad_reduce / overlap_param_gather")
        return contextlib.nullcontext(_RanOneByOne())

    return manager


@contextlib.contextmanager
def uncoalesced_gloo_collectives():
    """Inside the context, megatron-core's distributed data parallel (gradient reduce-scatter /
    all-reduce, distributed optimizer all-gather) issues its collectives one by one on gloo groups
    instead of through ``torch.distributed._coalescing_manager``; NCCL groups are untouched.

    gloo's coalesced collectives (``allgather_into_tensor_coalesced``, ``reduce_scatter_tensor_coalesced``)
    take host tensors only: given CUDA tensors, as when ranks share a GPU over gloo, they crash the
    process. The plain collectives accept CUDA tensors. Synchronous collectives only (megatron-core
    is built here with ``overlap_grad_reduce=False`` and ``overlap_param_gather=False``).
    """
    from megatron.core.distributed import param_and_grad_buffer as buffers

    real = buffers._coalescing_manager
    buffers._coalescing_manager = _coalescing_unless_gloo(real)
    try:
        yield
    finally:
        buffers._coalescing_manager = real
