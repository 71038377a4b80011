"""Layer-input offloading (``offload_layer_inputs`` / ``--cpu-offloading``, and
``offload_num_layers`` / ``--cpu-offloading-num-layers``).

With full activation recompute the decoder keeps one tensor per layer between forward and
backward, the layer input ``[s, b, hidden]`` (2 bytes x hidden a token in bf16: 64 KiB a token for
TNL-1B's 16 x 2048). :class:`LayerInputOffloader`'s saved-tensor hooks, active during the
decoder's forward, move every saved CUDA tensor of at least ``min_bytes`` (with recompute: the
layer inputs) to pinned host memory on a side stream, overlapped with the next layer's forward;
backward waits for the copy back of the layer it needs and starts the copy of the layer before it,
so at most two layer inputs are on the GPU: a copy back lives as long as autograd holds its layer's
node (until that layer's backward is done), the offloader itself keeps only weak references. On CPU
the same code path runs with plain host copies (what the tests check).

``num_layers`` = N moves only what the first N layers of the stage save; the later layers' saved
tensors stay on the device. The first layers are the ones worth moving: their inputs wait longest
for their backward, the last layers' are needed right after the forward. So N trades host memory
(N layer inputs, pinned) for GPU memory (the L - N others), for a host with less memory than all L
layer inputs need. The decoder's layer pre-hooks tell the offloader which layer runs
(:meth:`LayerInputOffloader.enter_layer`); what the decoder saves after its last layer (the final
norm's input) counts as the last layer's. A tensor counts for the layer whose forward started last
when it is saved: megatron-core's checkpoint saves a unit's input once the unit has run, so with
``recompute_num_layers`` k > 1 a unit's input moves when the unit's last layer is among the first N.
The kept tensors keep their place in the backward order: the backward of the first kept layer
starts the copy back of the last moved one, so the GPU holds max(L - N, 2) layer inputs at a time.

megatron-core's own ``cpu_offloading`` does not apply: it needs Transformer Engine and refuses
activation recompute, which these lengths need; its ``fine_grained_activation_offloading``
offloads module inputs of a non-recomputed layer. The chunked recompute that bounds the other
half of the memory (one layer's working set) is :mod:`megatron_lasp.models.chunked`.
"""

from __future__ import annotations

import weakref
from typing import List, Optional

import torch

__all__ = ["LayerInputOffloader"]


class _Saved:
    """A saved tensor's place in the forward order: ``group`` (weak references to the saved
    tensors of one forward, in order) and its ``index`` there. The group holds no strong
    reference, so a tensor is freed as soon as autograd releases its node (after its backward)."""

    __slots__ = ("group", "index", "__weakref__")

    def __init__(self, group: List["weakref.ref"]):
        self.group, self.index = group, len(group)
        group.append(weakref.ref(self))

    def previous(self) -> Optional["_Saved"]:
        return self.group[self.index - 1]() if self.index > 0 else None


class _Kept(_Saved):
    """A saved tensor left on its device (a layer past the first ``num_layers``)."""

    __slots__ = ("tensor", "used")

    def __init__(self, tensor, group):
        super().__init__(group)
        self.tensor, self.used = tensor, False


class _Packed(_Saved):
    """One offloaded tensor: its host copy and, around backward, its device copy."""

    __slots__ = ("host", "device", "shape", "dtype", "offloaded", "loaded", "gpu")

    def __init__(self, host, device, shape, dtype, offloaded, group):
        super().__init__(group)
        self.host, self.device, self.shape, self.dtype = host, device, shape, dtype
        self.offloaded, self.loaded, self.gpu = offloaded, None, None


class LayerInputOffloader:
    """Saved-tensor hooks that keep large saved tensors in (pinned) host memory between forward and
    backward; see the module docstring.

    Use::

        off = LayerInputOffloader(num_layers=None)  # None: every layer's saved tensors move
        with off.hooks():          # around the model's forward
            with off.active():     # around the part whose saved tensors move (the decoder)
                off.enter_layer(0) # at each layer's start (the decoder's layer pre-hooks)
                ...
            off.finish_forward()   # starts the copy back of the last one

    ``stats`` counts the tensors and bytes moved, the tensors ``kept`` on the device (layers past
    ``num_layers``) and the copies back (for tests and logs).
    """

    def __init__(self, min_bytes: int = 1 << 20, num_layers: Optional[int] = None):
        self.min_bytes = min_bytes
        self.num_layers = num_layers
        self._active = False
        self._layer = 0
        self._stream = None
        self._group: Optional[List[weakref.ref]] = None
        self.stats = {"offloaded": 0, "bytes": 0, "reloaded": 0, "kept": 0}

    # -- contexts
    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    class _Active:
        def __init__(self, owner):
            self.owner = owner

        def __enter__(self):
            self.owner._active = True
            self.owner._group = []
            self.owner._layer = 0

        def __exit__(self, *exc):
            self.owner._active = False
            return False

    def active(self):
        return LayerInputOffloader._Active(self)

    def enter_layer(self, index: int) -> None:
        """The stage's layer ``index`` (0-based) starts its forward: what is saved from now on is
        that layer's."""
        self._layer = index

    def finish_forward(self) -> None:
        """Start bringing back the last offloaded tensor (backward needs it first)."""
        group, self._group = self._group, None
        last = group[-1]() if group else None
        if last is not None:
            self._prefetch(last)

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
        if not t.is_cuda and t.device.type != "cpu":
            return t
        if self.num_layers is not None and self._layer >= self.num_layers:
            self.stats["kept"] += 1
            return _Kept(t.detach(), self._group)  # detached: no cycle through the node that saves it
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
        else:
            host, done = t.detach().clone(), None  # CPU: a plain copy, same code path
        packed = _Packed(host, t.device, t.shape, t.dtype, done, self._group)
        self.stats["offloaded"] += 1
        self.stats["bytes"] += t.numel() * t.element_size()
        return packed

    def _prefetch(self, p: _Saved) -> None:
        if not isinstance(p, _Packed) or p.gpu is not None or p.host is None:  # kept, on its way, or used
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
        if isinstance(p, _Kept):
            first, p.used = not p.used, True
            t = p.tensor
        elif isinstance(p, _Packed):
            first = p.host is not None
            if p.gpu is None:
                self._prefetch(p)
            if p.loaded is not None:
                torch.cuda.current_stream(p.device).wait_event(p.loaded)
            t = p.gpu  # freed with ``p``, when autograd releases this node (after its backward)
            p.loaded, p.host = None, None
            if first:
                self.stats["reloaded"] += 1
        else:
            return p
        if first:
            previous = p.previous()
            if previous is not None:
                self._prefetch(previous)  # overlaps with this layer's recompute + backward
        return t
