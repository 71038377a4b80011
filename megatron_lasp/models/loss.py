"""Output layer + cross-entropy that never holds the ``[tokens, vocab]`` logits.

:func:`linear_cross_entropy` replaces megatron-core's ``output_layer`` + ``vocab_parallel_cross_entropy``
on the last pipeline stage. It walks over the tokens in chunks: per chunk it computes the logits of
this TP rank's vocabulary slice in fp32 (bf16/fp16 inputs, fp32 accumulation and output), their
log-sum-exp and target logit (reduced over the TP group: the vocabulary is split over TP), and the
per-token loss; the chunk's logits are then dropped. Peak extra memory is one chunk of logits
(``chunk x vocab / tp`` fp32) instead of several ``[tokens, vocab / tp]`` tensors.

Gradients. Two modes, both exact:

- ``loss_weights`` given (the training loop passes its loss mask): the gradients are computed in the
  forward pass, chunk by chunk, for the reduction ``c * sum(loss_weights * loss)`` (any scalar ``c``,
  e.g. 1 / global loss tokens); backward only scales them by ``c``. This is the usual fused
  linear-cross-entropy design: three matmuls over the vocabulary (logits, grad input, grad weight),
  as the plain path. Backward checks that the incoming per-token gradient IS proportional to
  ``loss_weights`` and raises otherwise (one host sync per micro-batch).
- no ``loss_weights``: forward saves the per-token log-sum-exp (4 bytes a token); backward recomputes
  each chunk's logits and applies any per-token gradient (one extra matmul).

The elementwise work on each chunk of logits (softmax statistics, the logits' gradient) runs as
PyTorch ops (``kernel="torch"``, the function's default and the reference) or as two Triton
kernels (``kernel="triton"``, :mod:`megatron_lasp.ops.cross_entropy`: two reads of the fp32 chunk
and one write of its gradient; 1.6x faster on an H100, what training on a GPU runs). Both compute
the same formulas.

Inputs/outputs follow megatron-core: ``hidden`` ``[s, b, h]`` (with TP sequence parallelism this TP
rank's ``s / tp`` tokens; they are all-gathered first, as the output layer does), ``labels`` and the
returned per-token loss ``[b, s]`` (fp32). Without TP sequence parallelism the hidden states go
through megatron's copy-to-TP-region (backward: all-reduce of the input gradient).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_lasp.ops import cross_entropy as ce_kernels

__all__ = ["linear_cross_entropy", "default_chunk_size", "LinearCrossEntropyError"]

_TARGET_CHUNK_ELEMENTS = 1 << 28
"""Auto chunk size: about this many logits per chunk (1 GiB in fp32)."""


class LinearCrossEntropyError(RuntimeError):
    """The fused loss was used against its contract (the message says what to change)."""


def default_chunk_size(local_vocab: int) -> int:
    """Tokens per chunk for ``chunk_size=0``: ~2^28 logits per chunk, a multiple of 256, >= 256."""
    tokens = _TARGET_CHUNK_ELEMENTS // max(local_vocab, 1)
    return max(256, tokens // 256 * 256)


_OUT_DTYPE_OK: dict = {}


def _out_dtype_supported(device: torch.device) -> bool:
    """Whether ``torch.mm(bf16, bf16, out_dtype=torch.float32)`` works here (CUDA, torch >= 2.8)."""
    key = device.type
    if key not in _OUT_DTYPE_OK:
        ok = False
        if device.type == "cuda":
            try:
                a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
                ok = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
            except (TypeError, RuntimeError):
                ok = False
        _OUT_DTYPE_OK[key] = ok
    return _OUT_DTYPE_OK[key]


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as fp32 (fp32 accumulation; one rounding of a half-precision result at most)."""
    if a.dtype == torch.float32:
        return a @ b
    if _out_dtype_supported(a.device):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


def _addmm_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` with ``acc`` fp32 (returns the new accumulator)."""
    if a.dtype == torch.float32:
        return acc.addmm_(a, b)
    if _out_dtype_supported(a.device):
        try:
            return torch.addmm(acc, a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    return acc.add_(_mm_f32(a, b))


def _chunk_stats(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, group, kernel: str = "torch"):
    """Per-token global log-sum-exp and target logit of a chunk. Returns ``(lse, target_logit,
    local_max, in_range, idx)``; with ``kernel="torch"`` ``logits`` becomes ``exp(logits - local
    max)`` in place, with ``"triton"`` it is left as is and the last three are None."""
    n, v = logits.shape
    if kernel == "triton":
        m, s, tgt = ce_kernels.row_stats(logits, target, vocab_start)
        lse = m + s.log()
        in_range = idx = m = None
    else:
        local = target - vocab_start
        in_range = (local >= 0) & (local < v)
        idx = local.clamp(0, v - 1)
        tgt = logits.gather(1, idx.unsqueeze(1)).squeeze(1) * in_range
        m = logits.max(dim=1).values
        logits.sub_(m.unsqueeze(1)).exp_()
        lse = m + logits.sum(dim=1).log()
    if group is not None and group.size() > 1:
        gmax = lse.clone()
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
        both = torch.stack([(lse - gmax).exp(), tgt])
        dist.all_reduce(both, group=group)
        lse = gmax + both[0].log()
        tgt = both[1]
    return lse, tgt, m, in_range, idx


def _grad_logits_(e: torch.Tensor, m, lse, in_range, idx, scale: torch.Tensor) -> torch.Tensor:
    """In place: ``e = exp(logits - m)`` -> ``(softmax - onehot) * scale`` (per token)."""
    e.mul_((m - lse).exp().unsqueeze(1))
    rows = torch.arange(e.shape[0], device=e.device)
    e[rows, idx] -= in_range.to(e.dtype)
    e.mul_(scale.unsqueeze(1))
    return e


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, loss_weights, group, vocab_start, chunk, kernel):
        # x [T, h], weight [V_local, h], target [T] (global ids), loss_weights [T] fp32 or None,
        # kernel: "torch" or "triton" (the elementwise work on each chunk of logits)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_grad = need_x or need_w
        precompute = need_grad and loss_weights is not None
        T = x.shape[0]
        loss = torch.empty(T, dtype=torch.float32, device=x.device)
        lse_all = torch.empty(T, dtype=torch.float32, device=x.device) if need_grad and not precompute else None
        gx = torch.empty_like(x) if precompute and need_x else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if precompute and need_w else None
        wt = weight.t()
        for c0 in range(0, T, chunk):
            c1 = min(T, c0 + chunk)
            xc = x[c0:c1]
            logits = _mm_f32(xc, wt)
            lse, tgt, m, in_range, idx = _chunk_stats(logits, target[c0:c1], vocab_start, group, kernel)
            loss[c0:c1] = lse - tgt
            if precompute:
                if kernel == "triton":
                    g = ce_kernels.softmax_grad(logits, lse, target[c0:c1], vocab_start, loss_weights[c0:c1], x.dtype)
                else:
                    g = _grad_logits_(logits, m, lse, in_range, idx, loss_weights[c0:c1]).to(x.dtype)
                if need_x:
                    gx[c0:c1] = g @ weight
                if need_w:
                    gw = _addmm_f32(gw, g.t(), xc)
                del g
            elif lse_all is not None:
                lse_all[c0:c1] = lse
            del logits
        ctx.precompute = precompute
        ctx.need = (need_x, need_w)
        ctx.group, ctx.vocab_start, ctx.chunk, ctx.kernel = group, vocab_start, chunk, kernel
        ctx.weight_dtype = weight.dtype
        if precompute:
            ctx.save_for_backward(gx, gw, loss_weights)
        elif need_grad:
            ctx.save_for_backward(x, weight, target, lse_all)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        need_x, need_w = ctx.need
        grad_loss = grad_loss.float()
        if ctx.precompute:
            gx, gw, w = ctx.saved_tensors
            ww = (w * w).sum()
            c = (grad_loss * w).sum() / ww.clamp_min(torch.finfo(torch.float32).tiny)
            residual = (grad_loss - c * w).abs().max()
            # one host sync; not inside a CUDA graph capture (cuda_graph.py), where it cannot run: the
            # eager warm-up steps before the capture ran it on the same reduction
            capturing = w.is_cuda and torch.cuda.is_current_stream_capturing()
            if not capturing and bool(
                    residual > 1e-5 * c.abs() * w.abs().max().clamp_min(1.0)):
                raise LinearCrossEntropyError(
                    "fused linear cross entropy: the per-token losses were reduced with weights that are "
                    "not proportional to the loss_mask given to the model; pass the mask you reduce "
                    "with, none at all, or use --no-fused-linear-cross-entropy"
                )
            grad_x = (gx * c.to(gx.dtype)) if need_x else None
            grad_w = (gw * c).to(ctx.weight_dtype) if need_w else None
            return grad_x, grad_w, None, None, None, None, None, None
        x, weight, target, lse_all = ctx.saved_tensors
        T = x.shape[0]
        grad_x = torch.empty_like(x) if need_x else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_w else None
        wt = weight.t()
        v = weight.shape[0]
        for c0 in range(0, T, ctx.chunk):
            c1 = min(T, c0 + ctx.chunk)
            xc = x[c0:c1]
            e = _mm_f32(xc, wt)
            if ctx.kernel == "triton":
                g = ce_kernels.softmax_grad(e, lse_all[c0:c1], target[c0:c1], ctx.vocab_start, grad_loss[c0:c1],
                                            x.dtype)
            else:
                local = target[c0:c1] - ctx.vocab_start
                in_range = (local >= 0) & (local < v)
                idx = local.clamp(0, v - 1)
                zero = torch.zeros_like(lse_all[c0:c1])
                e.sub_(lse_all[c0:c1].unsqueeze(1)).exp_()
                g = _grad_logits_(e, zero, zero, in_range, idx, grad_loss[c0:c1]).to(x.dtype)
            del e
            if need_x:
                grad_x[c0:c1] = g @ weight
            if need_w:
                gw = _addmm_f32(gw, g.t(), xc)
            del g
        return grad_x, (gw.to(ctx.weight_dtype) if need_w else None), None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group: Optional[dist.ProcessGroup] = None,
    sequence_parallel: bool = False,
    loss_weights: Optional[torch.Tensor] = None,
    chunk_size: int = 0,
    kernel: str = "torch",
) -> torch.Tensor:
    """Per-token cross-entropy of ``hidden @ weight.T`` against ``labels``, chunked over tokens.

    Args:
        hidden: ``[s, b, h]`` final hidden states (TP sequence parallel: this rank's ``s / tp``).
        weight: ``[vocab / tp, h]`` this TP rank's slice of the output layer (or tied embedding).
        labels: ``[b, s]`` global token ids.
        tp_group: the TP group the vocabulary is split over (None or size 1: no split).
        sequence_parallel: Megatron's TP sequence parallelism (all-gather ``hidden`` over TP first).
        loss_weights: ``[b, s]`` weights the caller reduces the losses with (up to a scalar), e.g.
            the loss mask: enables the gradients-in-forward mode (see the module docstring).
        chunk_size: tokens per chunk (0: :func:`default_chunk_size`).
        kernel: the elementwise work on each chunk of logits: ``"torch"`` (PyTorch ops) or
            ``"triton"`` (:mod:`megatron_lasp.ops.cross_entropy`; CUDA, or CPU under
            ``TRITON_INTERPRET=1``; the training default on a GPU).

    Returns:
        ``[b, s]`` fp32 per-token loss.
    """
    ce_kernels.check_kernel(kernel, hidden.device)
    tp = tp_group.size() if tp_group is not None else 1
    if tp > 1:
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
        )

        if sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, True, group=tp_group)
        else:
            hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    s, b, h = hidden.shape
    if labels.shape != (b, s):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match the hidden states' [b, s] = [{b}, {s}]")
    x = hidden.reshape(s * b, h)
    target = labels.transpose(0, 1).reshape(-1)
    weights = None
    if loss_weights is not None:
        if loss_weights.shape != labels.shape:
            raise ValueError(f"loss_mask shape {tuple(loss_weights.shape)} != labels shape {tuple(labels.shape)}")
        weights = loss_weights.transpose(0, 1).reshape(-1).float()
    if torch.is_autocast_enabled(x.device.type):
        # autocast (bf16 with --ddp-impl torch): the matmuls run in the autocast dtype, as the
        # output layer's would; the softmax and the loss stay fp32
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
    elif weight.dtype != x.dtype:
        x = x.to(weight.dtype)
    chunk = chunk_size if chunk_size and chunk_size > 0 else default_chunk_size(weight.shape[0])
    vocab_start = (tp_group.rank() if tp > 1 else 0) * weight.shape[0]
    with torch.autocast(device_type=x.device.type, enabled=False):
        loss = _LinearCrossEntropy.apply(x, weight, target, weights, tp_group if tp > 1 else None, vocab_start, chunk,
                                         kernel)
    return loss.view(s, b).transpose(0, 1).contiguous()
