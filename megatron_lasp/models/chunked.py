"""The whole-layer chunked recompute (``recompute_chunk_size`` / ``--recompute-chunk-size``).

:class:`LinearTransformerLayer` is megatron-core's ``TransformerLayer`` with its own checkpoint,
which keeps only the layer input (the tensor :mod:`megatron_lasp.models.offload` can move to the
host). On one GPU (its tokens one contiguous piece of the sequence) the whole layer runs in chunks
of that many tokens, forward and backward: the linear attention carries its recurrent state
``S [b, heads, d, d]`` (fp32) from one chunk to the next, as LASP carries it from rank to rank.
Forward keeps the state at each chunk start (``heads x d x d x 4`` bytes, 1 MiB a chunk for
TNL-1B); backward goes through the chunks last to first, recomputes one chunk from its input and
its entry state and back-propagates it with the gradient of its outputs and of the state it
passed on (``dS``), which gives the gradient of its entry state for the chunk before. Packed
documents: each chunk gets its own ``cu_seqlens`` (:func:`megatron_lasp.parallel.slices.window_documents`),
and the carried state is zeroed for a row whose document starts at the chunk's first token. So a
layer's working set (projections, attention, norms, MLP and their gradients, ~100 KB a token for
TNL-1B) exists for one chunk at a time, whatever the sequence length.

On a rank of a ``lasp`` group (:class:`_ChunkedLaspLayer`) the state entering the rank's slice
comes from the previous rank: forward first computes the slice's local state chunk by chunk (k / v
projections only) and passes it on, then runs the chunks from the received state; backward first
goes down to the attention output chunk by chunk (keeping ``dO``) and passes the state gradient
back, then runs the attention backward chunk by chunk: one more q / k / v projection in forward and
in backward (~7% of a step). The hop and the slice's plan are the sequence-parallel modes' own
(:class:`megatron_lasp.parallel.hop.StateHop`, :class:`megatron_lasp.parallel.slices.SliceTransform`
from :class:`~megatron_lasp.parallel.slices.SliceDocs`): the slice's state crosses it only for rows
without a document start in it, and the state gradient comes only from the tokens before a row's
first start. Per-token gates (``linear_attention_gate``, the attention's ``gate``): each chunk's kernel
applies the chunk's gates (the carried state decays by them), the slice's local state comes from
the kernel chunk by chunk, and the slice's transform from the slice's own cumulative gate
(:meth:`SliceDecays.from_gates <megatron_lasp.parallel.slices.SliceDecays.from_gates>`).

A Gated DeltaNet layer (``models/delta_net.py``) carries two things from chunk to chunk on one rank:
the delta-rule state ``[b, heads, Dk, Dv]`` (fp32) and its short convolution's last ``K - 1``
inputs ``[b, K - 1, channels]`` (those of an earlier document zeroed), a tuple the functions here
handle like the single state (every carried tensor batch first, so a row whose document starts at
the chunk is zeroed alike). On a rank of a sequence-parallel group it runs whole and the MLP in
chunks (``carries_over_sp``).

A softmax layer of a hybrid runs in query chunks (from ``config.softmax_query_chunks_from`` tokens of the
whole sequence; shorter sequences run its attention whole, the MLP in chunks): a chunk's queries attend to the keys and values
of every token up to its end (each query's softmax over the same keys as in one call over the
sequence). On one rank (:class:`_ChunkedSoftmaxLayer`) forward keeps the post-RoPE keys and values
of the whole sequence (``2 x kv heads x d`` values a token, 2 KiB for the 1:7 TNL-1B hybrid's 4
key/value heads); backward goes through the chunks last to first, recomputes one from its input
and the kept keys and values before it, and accumulates the gradients of those keys and values
(fp32) until their own chunk's backward takes them. On a rank of a group in the all-gather softmax
mode (:class:`_ChunkedSoftmaxSpLayer`) the slice's keys and values are computed chunk by chunk
(norm and projection only) and gathered over the group, in forward and again in backward (nothing
is kept); the backward cuts each chunk at the attention's inputs, reduce-scatters the keys' and
values' gradients to their ranks, then runs the norm and projection backward.

With TP sequence parallelism (its all-gather would interleave the ranks' chunks) or another SP
mode (for a softmax layer: Ulysses or the balanced all-gather), the attention half runs over the
rank's whole slice and only the MLP half (pre-MLP norm, GLU, projection, residual) in chunks. Apart from those
projections, no more compute than megatron-core's full recompute. With the flag off the layer is
megatron-core's unchanged.
"""

from __future__ import annotations

import copy
from typing import List

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_lasp.models.attention import StateCarry
from megatron_lasp.models.softmax_attention import KVCarry, KVOnly
from megatron_lasp.ops.lightning_attn import chunk_lightning_attn, decay_powers, doc_ids_from_cu_seqlens, state_decay
from megatron_lasp.parallel.comm import all_gather_flat, group_info, reduce_scatter_flat
from megatron_lasp.parallel.slices import (
    SliceDecays,
    SliceDocs,
    SliceTransform,
    local_state,
    window_documents,
)
from megatron_lasp.parallel.hop import StateHop

__all__ = ["LinearTransformerLayer", "chunk_slices"]


def chunk_slices(n: int, chunk: int):
    """``slice`` objects covering ``range(n)`` in pieces of ``chunk``."""
    return [slice(i, min(n, i + chunk)) for i in range(0, n, chunk)]



class _ParamGrads:
    """Gradients of a layer's parameters summed over the chunks of one backward, handed to
    autograd once (as the chunked Function's gradients of its parameter inputs): a data-parallel
    wrapper's hooks (torch DDP marks each parameter ready once; megatron-core DDP's bucketing)
    then see one gradient per parameter and step, as with megatron-core's recompute."""

    def __init__(self, params):
        self.params = params
        self.sums = [None] * len(params)

    def grad(self, outputs, grads, inputs):
        """The gradients of ``inputs`` (None where unused); the parameters' are added to the sums."""
        inputs = list(inputs)
        got = torch.autograd.grad(outputs, inputs + self.params, grads, allow_unused=True)
        for j, g in enumerate(got[len(inputs):]):
            if g is not None:
                self.sums[j] = g if self.sums[j] is None else self.sums[j].add_(g)
        return got[: len(inputs)]


def _cu_seqlens(kwargs):
    """The packed documents' starts of a layer call (global offsets over its rows), or None."""
    psp = kwargs.get("packed_seq_params")
    return None if psp is None else psp.cu_seqlens_q


def _sequence_docs(kwargs, B: int, T: int, device):
    """``[B, T]`` document ids of the whole sequence of a layer call, or None without documents."""
    cu = _cu_seqlens(kwargs)
    return None if cu is None else doc_ids_from_cu_seqlens(cu, B, T, device)


def _grad_sums(*tensors: torch.Tensor) -> List[torch.Tensor]:
    """Zeroed gradient accumulators shaped like ``tensors``, at least fp32 (sums of bf16 gradients)."""
    return [torch.zeros(t.shape, dtype=torch.promote_types(t.dtype, torch.float32), device=t.device)
            for t in tensors]


def _params(layer) -> List[torch.nn.Parameter]:
    return [p for p in layer.parameters() if p.requires_grad]


def _parts(state) -> list:
    """The tensors of a carried state: a tensor, or a tuple of them (a layer with more than one
    carried piece, e.g. Gated DeltaNet's delta-rule state and convolution tail)."""
    return [] if state is None else list(state) if isinstance(state, tuple) else [state]


def _packed(state, parts: list):
    """``parts`` in the structure of ``state``."""
    return tuple(parts) if isinstance(state, tuple) else parts[0]


def _run_chunks(layer, x, slices, plans, kwargs, state):
    """The layer's forward chunk by chunk from ``state``: ``(output, the state at each chunk start)``."""
    out = torch.empty_like(x)
    states = []
    for i, (sl, plan) in enumerate(zip(slices, plans)):
        states.append(state)
        out[sl], state = layer._forward_chunk(x[sl], state, plan, kwargs, want_final=i + 1 < len(slices))
    return out, states


class _ChunkedLayer(torch.autograd.Function):
    """The whole layer run chunk by chunk along the sequence, the attention's recurrent state
    carried from chunk to chunk; see :class:`LinearTransformerLayer`."""

    @staticmethod
    def forward(ctx, layer, chunk, kwargs, x, *params):
        T, B = x.shape[:2]
        cu = _cu_seqlens(kwargs)
        slices = chunk_slices(T, chunk)
        plans = [window_documents(cu, B, T, sl.start, sl.stop) for sl in slices]
        with torch.no_grad():
            out, states = _run_chunks(layer, x, slices, plans, kwargs, None)
        ctx.layer, ctx.kwargs, ctx.slices, ctx.plans, ctx.states, ctx.params = layer, kwargs, slices, plans, states, params
        ctx.save_for_backward(x)  # the one tensor offloading moves
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        sums = _ParamGrads(list(ctx.params))
        d_state = None
        for i in reversed(range(len(ctx.slices))):
            sl = ctx.slices[i]
            piece = x[sl].detach().requires_grad_(True)
            state = ctx.states[i]
            if state is not None:
                state = _packed(state, [t.detach().requires_grad_(True) for t in _parts(state)])
            with torch.enable_grad():
                y, final = ctx.layer._forward_chunk(piece, state, ctx.plans[i], ctx.kwargs,
                                                    want_final=d_state is not None)
            outputs, grads = [y], [grad_out[sl]]
            if d_state is not None:
                outputs += _parts(final)
                grads += _parts(d_state)
            entry = _parts(state)
            got = sums.grad(outputs, grads, [piece] + entry)
            grad_x[sl] = got[0]
            d_state = None
            if state is not None:  # a carried piece the chunk did not read gets a zero gradient
                d_state = _packed(state, [torch.zeros_like(t) if d is None else d for t, d in zip(entry, got[1:])])
            ctx.states[i] = None
            del y, final, piece, outputs, got
        return (None, None, None, grad_x, *sums.sums)


class _ChunkedSoftmaxLayer(torch.autograd.Function):
    """A softmax layer in query chunks on one rank; see the module docstring."""

    @staticmethod
    def forward(ctx, layer, chunk, kwargs, x, *params):
        T, B = x.shape[:2]
        docs = _sequence_docs(kwargs, B, T, x.device)
        attn = layer.self_attention
        slices = chunk_slices(T, chunk)
        out = torch.empty_like(x)
        keys = values = None  # [T, b, hkv, d], post-RoPE, filled chunk by chunk
        with torch.no_grad():
            for sl in slices:
                prev = sl.start > 0
                carry = KVCarry(sl.start, keys[:sl.start] if prev else None, values[:sl.start] if prev else None, docs)
                with attn.carrying_kv(carry):
                    mid, _ = layer._forward_attention(x[sl], **kwargs)
                    out[sl] = layer._forward_mlp(mid)
                if keys is None:
                    keys = carry.key.new_empty((T,) + carry.key.shape[1:])
                    values = carry.value.new_empty((T,) + carry.value.shape[1:])
                keys[sl], values[sl] = carry.key, carry.value
                del carry, mid
        ctx.layer, ctx.kwargs, ctx.slices, ctx.docs, ctx.params = layer, kwargs, slices, docs, params
        ctx.kv = [keys, values]  # on the device (not through the saved-tensor hooks that offload x)
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        keys, values = ctx.kv
        ctx.kv = None
        attn = ctx.layer.self_attention
        d_keys, d_values = _grad_sums(keys, values)
        grad_x = torch.empty_like(x)
        sums = _ParamGrads(list(ctx.params))
        for sl in reversed(ctx.slices):
            piece = x[sl].detach().requires_grad_(True)
            prev = [t[:sl.start].detach().requires_grad_(True) for t in (keys, values)] if sl.start else [None, None]
            carry = KVCarry(sl.start, prev[0], prev[1], ctx.docs)
            with torch.enable_grad(), attn.carrying_kv(carry):
                mid, _ = ctx.layer._forward_attention(piece, **ctx.kwargs)
                y = ctx.layer._forward_mlp(mid)
            # the chunk's keys and values also feed every later chunk: their gradients from there
            outputs = [y, carry.key, carry.value]
            grads = [grad_out[sl], d_keys[sl].to(carry.key.dtype), d_values[sl].to(carry.value.dtype)]
            got = sums.grad(outputs, grads, [piece] + (prev if sl.start else []))
            grad_x[sl] = got[0]
            if sl.start:
                d_keys[:sl.start] += got[1]
                d_values[:sl.start] += got[2]
            del y, mid, carry, piece, prev, outputs, grads, got
        return (None, None, None, grad_x, *sums.sums)


def _qkv_only(layer, piece, start, docs, kwargs):
    """The post-RoPE ``(query, key, value)`` of one chunk starting at global position ``start``:
    the layer's forward stopped right before its attention (graph tensors when gradients are on)."""
    carry = KVCarry(start, None, None, docs, kv_only=True)
    with layer.self_attention.carrying_kv(carry):
        try:
            layer._forward_attention(piece, **kwargs)
        except KVOnly:
            pass
    return carry.query, carry.key, carry.value


class _ChunkedSoftmaxSpLayer(torch.autograd.Function):
    """A softmax layer in query chunks on a rank of a sequence-parallel group (the all-gather
    mode): the keys and values of the slices before this one come from their ranks.

    forward: (1) chunk by chunk the slice's post-RoPE keys and values (norm and projection only);
    (2) one all-gather of them over the group (rank-major is position-major: the sequence's keys
    in order); (3) the chunks as on one rank, each against the gathered keys and values up to its
    end. Nothing but the input is kept.
    backward: (1) and (2) again; (3) chunks last to first, the layer's backward cut at the
    attention's inputs: the gradients of the parameters after it, the residual's share of the
    input gradient, the chunk's query gradient, and the gradients of every key and value it reads
    (fp32 sums over the sequence); (4) one reduce-scatter: each rank gets its own keys' and values'
    gradients from every rank's queries; (5) chunk by chunk the norm and projection backward from
    the query, key and value gradients.
    """

    @staticmethod
    def _gathered(layer, x, slices, base, docs, kwargs, info):
        """``(keys, values)`` ``[W C, b, hkv, d]``: the sequence's post-RoPE keys and values (no grad)."""
        own = [_qkv_only(layer, x[sl], base + sl.start, docs, kwargs)[1:] for sl in slices]
        out = []
        for part in zip(*own):
            mine = torch.cat(part)  # [C, b, hkv, d]
            full = torch.empty((info.size * mine.numel(),), dtype=mine.dtype, device=mine.device)
            all_gather_flat(full, mine.reshape(-1), info.group)
            out.append(full.view(info.size * mine.shape[0], *mine.shape[1:]))
        return out

    @staticmethod
    def forward(ctx, layer, chunk, kwargs, x, *params):
        attn = layer.self_attention
        info = group_info(attn.sp_group)
        C, B = x.shape[:2]
        base = info.rank * C  # the slice's first position in the sequence
        docs = _sequence_docs(kwargs, B, C * info.size, x.device)
        slices = chunk_slices(C, chunk)
        with torch.no_grad():
            keys, values = _ChunkedSoftmaxSpLayer._gathered(layer, x, slices, base, docs, kwargs, info)  # (1), (2)
            out = torch.empty_like(x)
            for sl in slices:  # (3)
                start, stop = base + sl.start, base + sl.stop
                carry = KVCarry(start, keys[:stop], values[:stop], docs, own_included=True)
                with attn.carrying_kv(carry):
                    mid, _ = layer._forward_attention(x[sl], **kwargs)
                    out[sl] = layer._forward_mlp(mid)
                del carry, mid
        ctx.layer, ctx.kwargs, ctx.slices, ctx.params = layer, kwargs, slices, params
        ctx.info, ctx.base, ctx.docs = info, base, docs
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        layer, slices, info, base, docs = ctx.layer, ctx.slices, ctx.info, ctx.base, ctx.docs
        attn = layer.self_attention
        with torch.no_grad():
            keys, values = _ChunkedSoftmaxSpLayer._gathered(layer, x, slices, base, docs, ctx.kwargs, info)
        d_keys, d_values = _grad_sums(keys, values)
        sums = _ParamGrads(list(ctx.params))
        kept = [None] * len(slices)
        for i in reversed(range(len(slices))):  # (3) down to the attention's inputs
            sl = slices[i]
            start, stop = base + sl.start, base + sl.stop
            piece = x[sl].detach().requires_grad_(True)
            read = [t[:stop].detach().requires_grad_(True) for t in (keys, values)]
            carry = KVCarry(start, read[0], read[1], docs, own_included=True, cut=True)
            with torch.enable_grad(), attn.carrying_kv(carry):
                mid, _ = layer._forward_attention(piece, **ctx.kwargs)
                y = layer._forward_mlp(mid)
            d_residual, d_q, d_k, d_v = sums.grad([y], [grad_out[sl]], [piece, carry.query] + read)
            d_keys[:stop] += d_k
            d_values[:stop] += d_v
            kept[i] = (d_residual, d_q)
            del y, mid, carry, piece, read, d_k, d_v
        del keys, values
        mine = []  # (4) this slice's keys' and values' gradients from every rank's queries
        for full in (d_keys, d_values):
            part = torch.empty((full.numel() // info.size,), dtype=full.dtype, device=full.device)
            reduce_scatter_flat(part, full.view(-1), info.group)
            mine.append(part.view(full.shape[0] // info.size, *full.shape[1:]))
        del d_keys, d_values
        grad_x = torch.empty_like(x)
        for i, sl in enumerate(slices):  # (5) the norm and the projection
            d_residual, d_q = kept[i]
            kept[i] = None
            piece = x[sl].detach().requires_grad_(True)
            with torch.enable_grad():
                q, k, v = _qkv_only(layer, piece, base + sl.start, docs, ctx.kwargs)
            (got,) = sums.grad([q, k, v], [d_q, mine[0][sl].to(k.dtype), mine[1][sl].to(v.dtype)], [piece])
            grad_x[sl] = got + d_residual
            del q, k, v, piece, got
        return (None, None, None, grad_x, *sums.sums)


class _ChunkedLaspLayer(torch.autograd.Function):
    """The whole layer in chunks on a rank of a LASP group: this rank's slice is cut into chunks
    as on one GPU, and the state entering the slice comes from the previous rank. The passes
    (``docs/MEMORY.md``, "P GPUs with LASP"):

    forward: (1) chunk by chunk the k / v projection and the slice's local state ``S_loc`` (the
    state its own tokens leave, ``sum_t lam^(C-1-t) k_t^T v_t``, from its last document start on);
    (2) ``S_in`` from the previous rank, ``D S_in + S_loc`` to the next (``D = lam^C``, 0 for a
    row with a document start in the slice); (3) the chunked forward of the single-GPU case from
    ``S_in``.
    backward: (1) chunk by chunk the layer's backward down to the attention output ``o`` and the
    projection output (every parameter gradient but the projection's and the input norm's; keeps
    ``dO``, the gate's gradient and the residual's) and the local state gradient
    ``dS_loc = sum_t lam^(t+1) q_t^T dO_t`` (tokens before the slice's first document start);
    (2) ``dS`` from the next rank, ``D dS + dS_loc`` to the previous; (3) chunk by chunk, last to
    first, the attention backward with the carried state gradient, then the projection and the
    input norm.
    """

    @staticmethod
    def forward(ctx, layer, chunk, kwargs, x, *params):
        attn = layer.self_attention
        info = group_info(attn.sp_group)
        slopes = attn.slopes
        C, B = x.shape[:2]
        slices = chunk_slices(C, chunk)
        cu = _cu_seqlens(kwargs)
        start = info.rank * C  # the slice's first position in the rows of the whole sequence
        plans = [window_documents(cu, B, C * info.size, start + sl.start, start + sl.stop) for sl in slices]
        docs = None if cu is None else SliceDocs.of(cu, B, C, info.rank, info.size, x.device)
        with torch.no_grad():
            s_loc, gates = None, []  # (1) the slice's own state, chunk by chunk
            for sl, (cu_c, keep) in zip(slices, plans):
                h = layer.input_layernorm(x[sl])
                mixed, q, k, v = attn.qkv(h)
                g = None if attn.gate is None else attn.gate(h)  # per-token gates [s, b, heads]
                if g is not None:
                    gates.append(g)
                if cu_c is None and g is None:
                    L = sl.stop - sl.start
                    part = local_state(k.transpose(0, 1), v.transpose(0, 1), decay_powers(slopes, L, reverse=True))
                    s_loc = part if s_loc is None else s_loc * state_decay(slopes, L).view(1, -1, 1, 1) + part
                else:  # the kernel restarts the state at the chunk's documents and applies the gates
                    _, s_loc = chunk_lightning_attn(
                        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), **attn._decay(g),
                        initial_state=_entry(s_loc, (cu_c, keep)), output_final_state=True,
                        backend=attn.config.kernel_backend, cu_seqlens=cu_c,
                    )
            # the slice's transform: its own cumulative gate with per-token gates
            g_slice = torch.cat(gates).transpose(0, 1) if gates else None  # [B, C, heads]
            tr = SliceTransform.of(SliceDecays.for_slice(slopes, g_slice, C), docs, info.rank)
            # (2) S_in from the previous rank, T(S_in) + S_loc to the next
            hop = StateHop(s_loc.shape, s_loc.dtype, s_loc.device, info, forward=True)
            s_in = hop.pass_on(s_loc, tr)
            hop.finish()
            out, states = _run_chunks(layer, x, slices, plans, kwargs, s_in)  # (3)
        ctx.layer, ctx.kwargs, ctx.slices, ctx.plans, ctx.states, ctx.info = layer, kwargs, slices, plans, states, info
        ctx.params, ctx.transform = params, tr
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        layer, attn, tr = ctx.layer, ctx.layer.self_attention, ctx.transform
        kept = [None] * len(ctx.slices)
        sums = _ParamGrads(list(ctx.params))
        ds_loc = None
        for i in reversed(range(len(ctx.slices))):  # (1) down to o and the projection output
            sl, plan = ctx.slices[i], ctx.plans[i]
            piece = x[sl].detach().requires_grad_(True)
            entry = _entry(ctx.states[i], plan)
            with torch.enable_grad(), attn.carrying(StateCarry(entry, False, cut=True)) as carry:
                mid, _ = layer._forward_attention(piece, **layer._chunk_kwargs(ctx.kwargs, plan))
                y = layer._forward_mlp(mid)
            # the residual's gradient, dO, and the gate's share of the projection's (None without a gate)
            d_residual, d_o, d_mixed = sums.grad([y], [grad_out[sl]], [piece, carry.o, carry.mixed])
            # dS_in's share of this chunk: only the tokens the entering state reaches (w_in)
            part = local_state(carry.q.transpose(0, 1), d_o, tr.w_in[..., sl])
            ds_loc = part if ds_loc is None else ds_loc + part
            kept[i] = (d_o, d_mixed, d_residual)
            del y, mid, carry, piece
        hop = StateHop(ds_loc.shape, ds_loc.dtype, ds_loc.device, ctx.info, forward=False)  # (2)
        d_state = hop.pass_on(ds_loc, tr.transpose)
        hop.finish()
        grad_x = torch.empty_like(x)
        for i in reversed(range(len(ctx.slices))):  # (3) the attention, projection and input norm
            sl, (cu_c, keep) = ctx.slices[i], ctx.plans[i]
            d_o, d_mixed, d_residual = kept[i]
            kept[i] = None
            piece = x[sl].detach().requires_grad_(True)
            entry = ctx.states[i]
            if entry is not None:
                entry = entry.detach().requires_grad_(True)
            with torch.enable_grad():
                h = layer.input_layernorm(piece)
                mixed, q, k, v = attn.qkv(h)
                o, final = chunk_lightning_attn(
                    q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                    **attn._decay(None if attn.gate is None else attn.gate(h)),
                    initial_state=_entry(entry, (cu_c, keep)), output_final_state=d_state is not None,
                    backend=attn.config.kernel_backend, cu_seqlens=cu_c,
                )
            outputs, grads = [o], [d_o]
            if d_state is not None:
                outputs.append(final)
                grads.append(d_state)
            if d_mixed is not None:
                outputs.append(mixed)
                grads.append(d_mixed)
            got = sums.grad(outputs, grads, [piece] + ([entry] if entry is not None else []))
            grad_x[sl] = got[0] + d_residual
            d_state = got[1] if entry is not None else None
            ctx.states[i] = None
            del outputs, grads, piece, mixed, q, k, v, o, final, got
        return (None, None, None, grad_x, *sums.sums)


def _entry(state, plan):
    """The state a chunk starts from: the carried one, zeroed for rows whose document starts at the
    chunk (every carried tensor has the batch first)."""
    keep = plan[1]
    if state is None or keep is None:
        return state
    rows = keep.reshape(-1)
    return _packed(state, [t * rows.view((-1,) + (1,) * (t.dim() - 1)).to(device=t.device, dtype=t.dtype)
                           for t in _parts(state)])


class _ChunkedMlpCheckpoint(torch.autograd.Function):
    """The attention half over the whole sequence, the MLP half in chunks (sequence parallelism)."""

    @staticmethod
    def forward(ctx, layer, chunk, kwargs, x, *params):
        with torch.no_grad():
            mid, _ = layer._forward_attention(x, **kwargs)
            out = torch.empty_like(mid)
            for sl in chunk_slices(mid.shape[0], chunk):
                out[sl] = layer._forward_mlp(mid[sl])
        ctx.layer, ctx.chunk, ctx.kwargs, ctx.params = layer, chunk, kwargs, params
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        layer, chunk = ctx.layer, ctx.chunk
        sums = _ParamGrads(list(ctx.params))
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            mid, _ = layer._forward_attention(x, **ctx.kwargs)
        mid_d = mid.detach()
        grad_mid = torch.empty_like(mid_d)
        for sl in chunk_slices(mid_d.shape[0], chunk):
            piece = mid_d[sl].detach().requires_grad_(True)
            with torch.enable_grad():
                y = layer._forward_mlp(piece)
            (grad_mid[sl],) = sums.grad([y], [grad_out[sl]], [piece])
            del y, piece
        (grad_x,) = sums.grad([mid], [grad_mid], [x])
        return (None, None, None, grad_x, *sums.sums)


class LinearTransformerLayer(TransformerLayer):
    """megatron-core's ``TransformerLayer``; with ``config.recompute_chunk_size > 0`` (training,
    gradients on) it runs under the chunked per-layer checkpoint of the module docstring."""

    def chunks_whole_layer(self) -> bool:
        """Whether the whole layer runs in chunks with a carried state: a linear-attention layer (a
        softmax layer has none: :meth:`chunks_query_chunks`) whose tokens are
        one contiguous piece of the sequence (no TP sequence parallelism), on one rank or a rank of
        a ``lasp`` group."""
        if not hasattr(self.self_attention, "carrying") or not self._contiguous_tokens():
            return False
        if self.self_attention.sp_group.size() == 1:
            return True
        return self.config.sequence_parallel_mode == "lasp" and getattr(self.self_attention, "carries_over_sp", True)

    def chunks_query_chunks(self) -> bool:
        """Whether the layer is a softmax layer that runs in query chunks: no TP sequence
        parallelism, one sequence-parallel rank or the all-gather softmax mode."""
        if not hasattr(self.self_attention, "carrying_kv") or not self._contiguous_tokens():
            return False
        return (self.self_attention.sp_group.size() == 1
                or self.config.softmax_sequence_parallel_mode == "allgather")

    def _contiguous_tokens(self) -> bool:
        """Whether this rank's tokens are one contiguous piece of the sequence: not under TP
        sequence parallelism, whose all-gather would interleave the ranks' chunks."""
        return not (self.config.sequence_parallel and self.config.tensor_model_parallel_size > 1)

    def _sequence_tokens(self, x: torch.Tensor) -> int:
        """Tokens of the whole sequence: this rank's ``[s, b, h]`` slice times the SP group."""
        return x.shape[0] * self.self_attention.sp_group.size()

    @staticmethod
    def _chunk_kwargs(kwargs, plan):
        """The layer's arguments for one chunk: its own ``cu_seqlens`` with packed documents."""
        cu = plan[0]
        if cu is None:
            return kwargs
        kwargs = dict(kwargs)
        psp = copy.copy(kwargs["packed_seq_params"])
        psp.cu_seqlens_q = psp.cu_seqlens_kv = cu
        kwargs["packed_seq_params"] = psp
        return kwargs

    def _forward_chunk(self, x, state, plan, kwargs, want_final):
        """``(layer output, state after the chunk or None)`` of the chunk ``x`` that starts from ``state``."""
        kwargs = self._chunk_kwargs(kwargs, plan)
        state = _entry(state, plan)
        with self.self_attention.carrying(StateCarry(state, want_final)) as carry:
            mid, _ = self._forward_attention(x, **kwargs)
            y = self._forward_mlp(mid)
        return y, carry.final

    def forward(self, *args, **kwargs):
        chunk = getattr(self.config, "recompute_chunk_size", 0)
        if not (chunk > 0 and self.training and torch.is_grad_enabled()):
            return super().forward(*args, **kwargs)
        kwargs.pop("dynamic_inference_decode_only", None)
        if kwargs.get("inference_context") is not None:
            return super().forward(*args, **kwargs)
        if args:
            x, args = args[0], args[1:]
        else:
            x = kwargs.pop("hidden_states")
        if args:
            raise TypeError("LinearTransformerLayer: pass the layer arguments after hidden_states by keyword")
        if self.chunks_query_chunks() and self._sequence_tokens(x) >= self.config.softmax_query_chunks_from:
            function = _ChunkedSoftmaxLayer if self.self_attention.sp_group.size() == 1 else _ChunkedSoftmaxSpLayer
        elif not self.chunks_whole_layer():
            function = _ChunkedMlpCheckpoint
        elif self.self_attention.sp_group.size() == 1:
            function = _ChunkedLayer
        else:
            function = _ChunkedLaspLayer
        out = function.apply(self, chunk, kwargs, x, *_params(self))
        return out, kwargs.get("context")
