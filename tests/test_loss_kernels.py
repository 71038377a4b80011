"""The Triton kernels of the fused loss's softmax part (``megatron_lasp.ops.cross_entropy``).

Run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` through ``monkeypatch``; the kernels are
built for the interpreter at launch time):

- each kernel against fp64 math on odd sizes (vocabulary slices shorter than, equal to and not a
  multiple of the interpreter's 64-column block), targets inside and outside the slice;
- ``linear_cross_entropy(kernel="triton")`` against ``kernel="torch"``: per-token loss and the
  gradients of the hidden states and the weight, with loss weights (gradients in forward) and
  without (recompute in backward), chunks that do not divide the tokens, TP 1 and TP 2 (the
  vocabulary split over two gloo ranks, against the one-process run);
- ``kernel="triton"`` on CPU without the interpreter, and an unknown kernel, are refused;
- ``--cross-entropy-kernel triton`` reaches the model and trains as ``torch`` (one rank).
- ``@pytest.mark.gpu``: the compiled kernels in bf16 on CUDA against the torch path and fp32.
"""

from __future__ import annotations

import pytest
import torch

from megatron_lasp.testing import spawn

SEED = 7
TOL = 2e-6  # fp32 round-off of the two formulas (online vs two-pass max) is ~1e-7


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


@pytest.mark.parametrize("v", [1, 50, 64, 203])
def test_kernels_match_fp64(monkeypatch, v):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from megatron_lasp.ops.cross_entropy import row_stats, softmax_grad

    g = torch.Generator().manual_seed(SEED)
    n, vocab_start = 9, 100
    logits = torch.randn(n, v, generator=g) * 4
    logits[0, -1] = 30.0  # the max in the last (partial) block: the online rescaling is exercised
    target = vocab_start + torch.randint(-v, 2 * v, (n,), generator=g)  # about a third in the slice
    target[:2] = torch.tensor([vocab_start, vocab_start + v - 1])  # the slice's edges
    target[2:4] = torch.tensor([vocab_start - 1, vocab_start + v])  # just outside
    scale = torch.rand(n, generator=g)

    m, s, tlog = row_stats(logits, target, vocab_start)
    l64 = logits.double()
    local = target - vocab_start
    in_range = (local >= 0) & (local < v)
    want_t = torch.where(in_range, l64.gather(1, local.clamp(0, v - 1)[:, None])[:, 0],
                         torch.zeros((), dtype=l64.dtype))
    assert torch.equal(m, logits.max(dim=1).values)
    assert _rel(m.double() + s.double().log(), torch.logsumexp(l64, dim=1)) < 1e-7
    assert torch.equal(tlog, want_t.float())

    lse = torch.logsumexp(l64, dim=1).float() - 0.25  # as if other TP ranks held more of the row
    got = softmax_grad(logits, lse, target, vocab_start, scale, torch.float32)
    want = (l64 - lse.double()[:, None]).exp()
    want[in_range.nonzero()[:, 0], local[in_range]] -= 1
    want *= scale.double()[:, None]
    assert _rel(got, want) < 1e-6
    got16 = softmax_grad(logits, lse, target, vocab_start, scale, torch.bfloat16)
    # within one bf16 ulp: compiled kernels round to nearest, the interpreter truncates
    assert got16.dtype == torch.bfloat16 and bool(((got16.float() - got).abs() <= got.abs() * 2**-7).all())


def _loss_and_grads(hidden, weight, labels, mask, kernel, chunk, tp_group=None):
    from megatron_lasp.models.loss import linear_cross_entropy

    x = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = linear_cross_entropy(x, w, labels, tp_group=tp_group, loss_weights=mask, chunk_size=chunk, kernel=kernel)
    g = torch.Generator().manual_seed(SEED + 1)
    upstream = mask if mask is not None else torch.rand(labels.shape, generator=g)  # any reduction
    (loss * upstream).sum().backward()
    return loss.detach(), x.grad, w.grad


def _inputs(s=29, b=2, h=16, v=203):
    g = torch.Generator().manual_seed(SEED)
    hidden = torch.randn(s, b, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.7
    labels = torch.randint(0, v, (b, s), generator=g)
    mask = (torch.rand(b, s, generator=g) > 0.25).float()
    return hidden, weight, labels, mask


@pytest.mark.parametrize("chunk", [0, 13])
@pytest.mark.parametrize("with_mask", [False, True], ids=["recompute", "grads-in-forward"])
def test_triton_loss_equals_torch_loss(monkeypatch, chunk, with_mask):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    hidden, weight, labels, mask = _inputs()
    mask = mask if with_mask else None
    want = _loss_and_grads(hidden, weight, labels, mask, "torch", chunk)
    got = _loss_and_grads(hidden, weight, labels, mask, "triton", chunk)
    for name, a, b in zip(("loss", "d_hidden", "d_weight"), got, want):
        assert _rel(a, b) < TOL, (name, _rel(a, b))


def _tp2(rank, world_size, with_mask):
    import os

    import torch.distributed as dist

    os.environ["TRITON_INTERPRET"] = "1"
    hidden, weight, labels, mask = _inputs(s=21, v=2 * 101)
    v_local = weight.shape[0] // world_size
    mine = weight[rank * v_local:(rank + 1) * v_local]
    # numpy, not tensors: tensors would travel as shared-memory handles that die with the rank
    return {k: [t.numpy() for t in _loss_and_grads(hidden, mine, labels, mask if with_mask else None, k, 8,
                                                   tp_group=dist.group.WORLD)]
            for k in ("torch", "triton")}


@pytest.mark.parametrize("with_mask", [False, True], ids=["recompute", "grads-in-forward"])
def test_triton_loss_tp2_equals_one_process(with_mask):
    hidden, weight, labels, mask = _inputs(s=21, v=2 * 101)
    mask = mask if with_mask else None
    want_loss, want_dx, want_dw = _loss_and_grads(hidden, weight, labels, mask, "torch", 8)
    ranks = [{k: [torch.from_numpy(a) for a in r[k]] for k in r} for r in spawn(_tp2, world_size=2, args=(with_mask,))]
    for kernel in ("torch", "triton"):
        loss, dx = ranks[0][kernel][0], ranks[0][kernel][1]
        dw = torch.cat([r[kernel][2] for r in ranks])
        for name, a, b in (("loss", loss, want_loss), ("d_hidden", dx, want_dx), ("d_weight", dw, want_dw)):
            assert _rel(a, b) < TOL, (kernel, name, _rel(a, b))
        assert _rel(ranks[1][kernel][0], want_loss) < TOL


def test_triton_kernel_refused_without_interpreter(monkeypatch):
    from megatron_lasp.models.loss import linear_cross_entropy

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, weight, labels, _ = _inputs()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        linear_cross_entropy(hidden, weight, labels, kernel="triton")
    with pytest.raises(ValueError, match="not one of torch, triton"):
        linear_cross_entropy(hidden, weight, labels, kernel="cuda")


TRAIN = [
    "--model-preset", "tiny", "--mock-data", "--seq-length", "64", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--train-iters", "2", "--lr", "3e-3", "--lr-warmup-iters", "1",
    "--log-interval", "2", "--eval-interval", "2", "--eval-iters", "1", "--seed", "7",
    "--make-vocab-size-divisible-by", "64", "--eod-mask-loss", "--cross-entropy-chunk-size", "48",
]


def _train(rank, world_size):
    from megatron_lasp.training import main

    return {k: list(main(TRAIN + ["--cross-entropy-kernel", k], destroy=False).losses) for k in ("torch", "triton")}


def test_training_flag_selects_the_triton_kernel(monkeypatch):
    """``--cross-entropy-kernel triton`` reaches the loss (the model config) and trains as torch;
    on CPU without the interpreter the flag is refused at parse time."""
    from megatron_lasp.training.arguments import ArgumentError, parse_config
    from megatron_lasp.training.loop import model_config_from_run

    from megatron_lasp.training import arguments

    # the default: PyTorch ops on CPU (the reference), the kernels on a GPU (measured faster there)
    monkeypatch.setattr(arguments, "default_on_gpu", lambda: False)
    assert model_config_from_run(parse_config(TRAIN)).cross_entropy_kernel == "torch"
    on_gpu = TRAIN + ["--ddp-impl", "torch", "--distributed-backend", "gloo"]
    monkeypatch.setattr(arguments, "default_on_gpu", lambda: True)
    assert model_config_from_run(parse_config(on_gpu)).cross_entropy_kernel == "triton"
    chosen = parse_config(on_gpu + ["--cross-entropy-kernel", "torch"])
    assert model_config_from_run(chosen).cross_entropy_kernel == "torch"
    monkeypatch.undo()
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ArgumentError, match="^--cross-entropy-kernel triton needs CUDA"):
            parse_config(TRAIN + ["--cross-entropy-kernel", "triton"])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_run = parse_config(TRAIN + ["--cross-entropy-kernel", "triton"])
    assert model_config_from_run(triton_run).cross_entropy_kernel == "triton"
    runs = spawn(_train, 1, timeout=300, env={"TRITON_INTERPRET": "1"})[0]
    assert len(runs["torch"]) == 2 and all(abs(x) > 0 for x in runs["torch"])
    for g, w in zip(runs["triton"], runs["torch"]):
        assert abs(g - w) <= 2e-6 * abs(w), runs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_triton_loss_bf16():
    """Compiled kernels: against fp64 at an unaligned slice (V = 1000, targets in and out), then the
    whole loss in bf16 against the torch path and an fp32 reference (partial chunks and blocks)."""
    from megatron_lasp.models.loss import linear_cross_entropy
    from megatron_lasp.ops.cross_entropy import row_stats, softmax_grad

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(SEED)
    logits = torch.randn(300, 1000, device=dev, generator=gen) * 4
    target = 500 + torch.randint(-1000, 2000, (300,), device=dev, generator=gen)
    m, s, tlog = row_stats(logits, target, 500)
    lse64 = torch.logsumexp(logits.double(), dim=1)
    assert _rel(m.double() + s.double().log(), lse64) < 1e-6
    local = target - 500
    in_range = (local >= 0) & (local < 1000)
    want_t = logits.gather(1, local.clamp(0, 999)[:, None])[:, 0] * in_range
    assert torch.equal(tlog, want_t)
    scale = torch.rand(300, device=dev, generator=gen)
    want = (logits.double() - lse64[:, None]).exp()
    want[in_range.nonzero()[:, 0], local[in_range]] -= 1
    want *= scale.double()[:, None]
    assert _rel(softmax_grad(logits, lse64.float(), target, 500, scale, torch.float32), want) < 1e-5

    s_, h, v = 8192, 1024, 32000
    hidden = torch.randn(s_, 1, h, device=dev, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(v, h, device=dev, generator=gen) * 0.02).to(torch.bfloat16)
    labels = torch.randint(0, v, (1, s_), device=dev, generator=gen)
    mask = (torch.rand(1, s_, device=dev, generator=gen) > 0.1).float()
    xf, wf = hidden.float().requires_grad_(), weight.float().requires_grad_()
    ref = torch.nn.functional.cross_entropy((xf[:, 0] @ wf.t()), labels[0], reduction="none")[None]
    (ref * mask).sum().div(mask.sum()).backward()
    for with_mask in (True, False):
        runs = {}
        for kernel in ("torch", "triton"):
            x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            loss = linear_cross_entropy(x, w, labels, loss_weights=mask if with_mask else None, chunk_size=3000,
                                        kernel=kernel)
            (loss * mask).sum().div(mask.sum()).backward()
            runs[kernel] = (loss.detach(), x.grad.float(), w.grad.float())
        for name, a, b, fp32 in zip(("loss", "d_hidden", "d_weight"), runs["triton"], runs["torch"],
                                    (ref.detach(), xf.grad, wf.grad)):
            assert _rel(a, b) < (1e-5 if name == "loss" else 5e-3), (with_mask, name, _rel(a, b))
            assert _rel(a, fp32) < 1e-2, (with_mask, name, _rel(a, fp32))
