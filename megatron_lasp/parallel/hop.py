"""The LASP state hop: one state (or state gradient) passed one rank along a sequence-parallel group.

Every pass of LASP-1 (the mode ``lasp.py`` and the whole-layer chunked recompute of
``megatron_lasp/models/chunked.py``) has the same shape: this rank receives the state left by the
slices before it (forward; backward: the state gradient of the slices after it), combines it with
its own slice's contribution and passes the result on at once. :class:`StateHop` is that one step:

1. ``StateHop(...)`` posts the receive before the caller's local work, so the sender never waits;
2. :meth:`StateHop.pass_on` waits for the received state and sends
   ``keep * local + transform(received)`` on (``transform``: how this slice carries a state
   through it, :class:`megatron_lasp.parallel.slices.SliceTransform`);
3. :meth:`StateHop.join` makes the current stream wait for the received state before the caller
   uses it; :meth:`StateHop.finish` waits for the send.

The ends of the chain: its first rank may start from a given state instead of a received one
(``entry``: forward, the group's initial state; backward, the gradient of its final state), and
its last rank may keep what it would send on (``keep_end``: forward, the final state; backward,
the initial state's gradient); the ranks between them do not change.

On CUDA, step 2 runs on a side stream, so the caller's work queued after it (LASP's output pass)
does not wait for the incoming state: the chain of W-1 hops overlaps every rank's output pass. On
the CPU (gloo) the steps run in order on the host. The point-to-point itself is
``comm.send_state`` / ``comm.recv_state`` (on a gloo group a CUDA state goes through pinned host
memory: ranks sharing a GPU; same results, no overlap to speak of).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from megatron_lasp.parallel.comm import GroupInfo, recv_state, send_state

__all__ = ["StateHop"]

_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    """The stream that waits for, combines and sends the state on CUDA; None on the CPU."""
    if device.type != "cuda":
        return None
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=key)
    return _SIDE_STREAMS[key]


def _post_recv(shape, dtype, device, src: Optional[int], group) -> Tuple[Optional[torch.Tensor], Optional[dist.Work]]:
    """Post the receive of a ``shape`` tensor from global rank ``src``: ``(buffer, work)``, Nones without ``src``."""
    if src is None:
        return None, None
    buf = torch.empty(shape, dtype=dtype, device=device)
    return buf, recv_state(buf, src, group)


def _post_send(x: torch.Tensor, dst: Optional[int], group) -> Optional[dist.Work]:
    """Post the send of ``x`` to global rank ``dst`` (None: nothing)."""
    # The caller waits after its remaining local work. On NCCL the wait only orders the current
    # stream after the send; the receiver posted its receive before its own kernel.
    # (A gloo group stages a CUDA state through host memory: then the send itself waits here.)
    return None if dst is None else send_state(x, dst, group)


@contextlib.contextmanager
def _on_side(side, *tensors):
    """Run the block on ``side`` after the work queued so far on the current stream (no-op on CPU)."""
    if side is None:
        yield
        return
    side.wait_stream(torch.cuda.current_stream())
    for t in tensors:
        if t is not None:
            t.record_stream(side)
    with torch.cuda.stream(side):
        yield


class StateHop:
    """One pass's hop along ``info``'s group; see the module docstring.

    Args:
        shape: the state's shape, ``[B, H, Dk, Dv]``.
        dtype: the state's dtype (fp32, fp64 for fp64 inputs).
        device: the state's device.
        info: this rank's place in the group.
        forward: True for the state (from the previous rank to the next), False for its gradient
            (from the next rank to the previous).
        entry: ``[B, H, Dk, Dv]`` (``dtype``), what the first rank of the chain takes as its
            received state (forward: the group's initial state; backward: the gradient of its
            final state); None: nothing (zero).
        keep_end: the last rank of the chain forms ``keep * local + carry(received)`` as well and
            keeps it as :attr:`end` (forward: the final state; backward: the gradient of the
            initial state).

    Attributes:
        end: see ``keep_end``; None elsewhere.
    """

    def __init__(self, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device, info: GroupInfo,
                 forward: bool, entry: Optional[torch.Tensor] = None, keep_end: bool = False):
        self.info = info
        self.src, self.dst = (info.prev, info.next) if forward else (info.next, info.prev)
        self._send: Optional[dist.Work] = None
        self._side = _side_stream(device)
        self._keep_end = keep_end and self.dst is None
        self.end: Optional[torch.Tensor] = None
        self.received, self._recv = _post_recv(shape, dtype, device, self.src, info.group)
        if self.src is None:
            self.received = entry

    def pass_on(self, local: torch.Tensor, carry=None, keep: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Wait for the received state, send ``keep * local + carry(received)`` on (in place in
        ``local``; on the chain's last rank, kept as :attr:`end` with ``keep_end``).

        Args:
            local: this slice's own contribution ``[B, H, Dk, Dv]`` (overwritten).
            carry: a callable ``state -> state`` carrying the received state through this slice
                (a :class:`megatron_lasp.parallel.slices.SliceTransform` or its transpose).
            keep: ``[B, 1, 1, 1]`` factor of ``local`` or None.

        Returns:
            The received state (``entry`` on the first rank of the chain); use it after :meth:`join`.
        """
        with _on_side(self._side, local, self.received, keep):
            self.wait()
            if self.dst is not None or self._keep_end:
                out = local
                if keep is not None:
                    out = out.mul_(keep)
                if self.received is not None:
                    out = out.add_(carry(self.received))
                if self.dst is None:
                    self.end = out
                else:
                    self._send = _post_send(out, self.dst, self.info.group)
        return self.received

    def wait(self) -> Optional[torch.Tensor]:
        """Wait for the received state now, on the current stream (a schedule without overlap);
        returns it. :meth:`pass_on` waits by itself."""
        if self._recv is not None:
            self._recv.wait()
            self._recv = None
        return self.received

    def join(self) -> None:
        """The current stream waits for the side stream's work (the received state) before using it."""
        if self._side is not None:
            torch.cuda.current_stream().wait_stream(self._side)

    def finish(self) -> None:
        """:meth:`join`, then wait for the send (the buffer may be reused afterwards)."""
        self.join()
        if self._send is not None:
            self._send.wait()
            self._send = None
