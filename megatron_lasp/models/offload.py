"""Layer-input offloading (``offload_layer_inputs`` / ``--cpu-offloading``).

With full activation recompute the decoder keeps one tensor per layer between forward and
backward, the layer input ``[s, b, hidden]`` (2 bytes x hidden a token in bf16: 64 KiB a token for
TNL-1B's 16 x 2048). :class:`LayerInputOffloader`'s saved-tensor hooks, active during the
decoder's forward, move every saved CUDA tensor of at least ``min_bytes`` (with recompute: the
layer inputs) to pinned host memory on a side stream, overlapped with the next layer's forward;
backward waits for the copy back of the layer it needs and starts the copy of the layer before it,
so at most two layer inputs are on the GPU. On CPU the same code path runs with plain host copies
(what the tests check).

megatron-core's own ``cpu_offloading`` does not apply: it needs Transformer Engine and refuses
activation recompute, which these lengths need; its ``fine_grained_activation_offloading``
offloads module inputs of a non-recomputed layer. The chunked recompute that bounds the other
half of the memory (one layer's working set) is :mod:`megatron_lasp.models.chunked`.
"""

from __future__ import annotations

from typing import List, Optional

import torch

__all__ = ["LayerInputOffloader"]


class _Packed:
    """One offloaded tensor: its host copy and, around backward, its device copy."""

    __slots__ = ("host", "device", "shape", "dtype", "offloaded", "loaded", "gpu", "group", "index")

    def __init__(self, host, device, shape, dtype, offloaded, group, index):
        self.host, self.device, self.shape, self.dtype = host, device, shape, dtype
        self.offloaded, self.loaded, self.gpu = offloaded, None, None
        self.group, self.index = group, index


class LayerInputOffloader:
    """Saved-tensor hooks that keep large saved tensors in (pinned) host memory between forward and
    backward; see the module docstring.

    Use::

        off = LayerInputOffloader()
        with off.hooks():          # around the model's forward
            with off.active():     # around the part whose saved tensors move (the decoder)
                ...
            off.finish_forward()   # starts the copy back of the last one

    ``stats`` counts the tensors and bytes moved (for tests and logs).
    """

    def __init__(self, min_bytes: int = 1 << 20):
        self.min_bytes = min_bytes
        self._active = False
        self._stream = None
        self._group: Optional[List[_Packed]] = None
        self.stats = {"offloaded": 0, "bytes": 0, "reloaded": 0}

    # -- contexts
    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    class _Active:
        def __init__(self, owner):
            self.owner = owner

        def __enter__(self):
            self.owner._active = True
            self.owner._group = []

        def __exit__(self, *exc):
            self.owner._active = False
            return False

    def active(self):
        return LayerInputOffloader._Active(self)

    def finish_forward(self) -> None:
        """Start bringing back the last offloaded tensor (backward needs it first)."""
        group, self._group = self._group, None
        if group:
            self._prefetch(group[-1])

    # -- hooks
    def _side_stream(self, device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def _pack(self, t: torch.Tensor):
        if not self._active or self._group is None or t.numel() * t.element_size() < self.min_bytes:
            return t
        if isinstance(t, torch.nn.Parameter) or isinstance(getattr(t, "_base", None), torch.nn.Parameter):
            return t  # weights stay where they are
        if t.is_cuda:
            side = self._side_stream(t.device)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(t.device))
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            with torch.cuda.stream(side):
                side.wait_event(ready)
                host.copy_(t, non_blocking=True)
                done = torch.cuda.Event()
                done.record(side)
            t.record_stream(side)  # its memory is not reused before the copy is done
        elif t.device.type == "cpu":
            host, done = t.detach().clone(), None  # CPU: a plain copy, same code path
        else:
            return t
        packed = _Packed(host, t.device, t.shape, t.dtype, done, self._group, len(self._group))
        self._group.append(packed)
        self.stats["offloaded"] += 1
        self.stats["bytes"] += t.numel() * t.element_size()
        return packed

    def _prefetch(self, p: _Packed) -> None:
        if p.gpu is not None or p.host is None:  # already on its way, or used
            return
        if p.device.type != "cuda":
            p.gpu = p.host
            return
        current = torch.cuda.current_stream(p.device)
        p.gpu = torch.empty(p.shape, dtype=p.dtype, device=p.device)  # allocated on the compute stream
        allocated = torch.cuda.Event()
        allocated.record(current)
        side = self._side_stream(p.device)
        with torch.cuda.stream(side):
            side.wait_event(allocated)
            side.wait_event(p.offloaded)
            p.gpu.copy_(p.host, non_blocking=True)
            p.loaded = torch.cuda.Event()
            p.loaded.record(side)

    def _unpack(self, p):
        if not isinstance(p, _Packed):
            return p
        first = p.host is not None
        if p.gpu is None:
            self._prefetch(p)
        if p.loaded is not None:
            torch.cuda.current_stream(p.device).wait_event(p.loaded)
        t = p.gpu  # kept until autograd releases the saved tensor (after this node's backward)
        p.loaded, p.host = None, None
        if not first:
            return t
        self.stats["reloaded"] += 1
        if p.index > 0:
            self._prefetch(p.group[p.index - 1])  # overlaps with this layer's recompute + backward
        return t
