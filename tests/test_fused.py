"""Fused elementwise kernels (``megatron_lasp.ops.fused``) and the selective elementwise recompute.

- Every fused op against its PyTorch reference, output and input gradients, fp32, in Triton's
  interpreter (the ranks are spawned with ``TRITON_INTERPRET=1`` set before Triton is imported).
- The tiny model with fusion on (interpreter) against fusion off: loss and every parameter grad.
- ``--recompute-modules elementwise``: the freed outputs really are freed after the forward, and
  the gradients are bit-identical to a run that keeps them (plain PyTorch path and fused path).
- ``@pytest.mark.gpu``: the same ops in bf16 on CUDA against an fp32 reference.
"""

from __future__ import annotations

import pytest
import torch

from megatron_lasp.testing import spawn

INTERP = {"TRITON_INTERPRET": "1"}
SEED = 11


def _op_cases():
    """(name, fused fn, reference fn, inputs) at tiny shapes, covering every kernel switch."""
    from megatron_lasp.ops import fused as F

    g = torch.Generator().manual_seed(SEED)

    def rn(*shape):
        return torch.randn(*shape, generator=g)

    cases = [("rms_norm", lambda x, w: F.rms_norm(x, w, 1e-5), lambda x, w: F.rms_norm_ref(x, w, 1e-5),
              [rn(5, 3, 40), rn(40)])]
    for parts in (3, 4):
        for qk, v in ((True, True), (True, False), (False, False)):
            cases.append((f"qkv_features-P{parts}-qk{int(qk)}-v{int(v)}",
                          lambda m, p=parts, qk=qk, v=v: F.qkv_features(m, 3, p, 16, qk, v),
                          lambda m, p=parts, qk=qk, v=v: F.qkv_features_ref(m, 3, p, 16, qk, v),
                          [rn(6, 2, 3 * parts * 16)]))
    for group in (1, 2):
        # o as the attention kernel returns it: [b, s, H, D] transposed to [s, b, H, D]
        cases.append((f"norm_gate-G{group}", lambda o, sg, w, G=group: F.norm_gate(o, sg, w, G, 1e-5),
                      lambda o, sg, w, G=group: F.norm_gate_ref(o, sg, w, G, 1e-5),
                      [rn(2, 7, 4, 16).transpose(0, 1), torch.rand(7, 2, 4, 16, generator=g), rn(64)]))
        cases.append((f"norm_gate-G{group}-nogate", lambda o, w, G=group: F.norm_gate(o, None, w, G, 1e-5),
                      lambda o, w, G=group: F.norm_gate_ref(o, None, w, G, 1e-5),
                      [rn(2, 7, 4, 16).transpose(0, 1), rn(64)]))
    for silu in (False, True):
        cases.append((f"glu-silu{int(silu)}", lambda x, s=silu: F.glu(x, s), lambda x, s=silu: F.glu_ref(x, s),
                      [rn(9, 2, 2 * 24)]))
    return cases


def _compare(fused_fn, ref_fn, inputs, device="cpu", dtype=torch.float32):
    """Max relative errors (outputs, input grads) of ``fused_fn`` against ``ref_fn`` in fp64/fp32."""
    a = [t.detach().to(device, dtype).clone().requires_grad_() for t in inputs]
    r = [t.detach().to(device, torch.float32).clone().requires_grad_() for t in inputs]
    out_a, out_r = fused_fn(*a), ref_fn(*r)
    out_a = out_a if isinstance(out_a, tuple) else (out_a,)
    out_r = out_r if isinstance(out_r, tuple) else (out_r,)
    pairs = [(x, y) for x, y in zip(out_a, out_r) if y is not None]
    assert all(x is not None for x, _ in pairs)
    gen = torch.Generator().manual_seed(SEED + 1)
    grads = [torch.randn(y.shape, generator=gen).to(device) for _, y in pairs]
    torch.autograd.backward([x for x, _ in pairs], [gr.to(dtype) for gr in grads])
    torch.autograd.backward([y for _, y in pairs], grads)

    def rel(x, y):
        x, y = x.detach().float(), y.detach().float()
        assert torch.isfinite(x).all()
        return ((x - y).norm() / y.norm().clamp_min(1e-30)).item()

    out_err = max(rel(x, y) for x, y in pairs)
    grad_err = max(rel(x.grad, y.grad) for x, y in zip(a, r))
    return out_err, grad_err


def _ops_rank(rank, world_size):
    from megatron_lasp.ops import fused as F

    assert F.interpreting()
    return {name: _compare(f, ref, inputs) for name, f, ref, inputs in _op_cases()}


def test_fused_ops_match_reference_in_interpreter(interpreter_results):
    errors = interpreter_results["ops"]
    assert len(errors) == 13
    for name, (out_err, grad_err) in errors.items():
        assert out_err < 1e-6 and grad_err < 1e-6, (name, out_err, grad_err)


# ---------------------------------------------------------------------------------------------- model


def _model_grads(fields, monkeypatch_discards=None):
    from megatron_lasp.models import build_linear_lm, linear_lm_config

    torch.manual_seed(SEED)
    model = build_linear_lm(linear_lm_config("tiny", use_cpu_initialization=True, **fields), 128)
    gen = torch.Generator().manual_seed(SEED + 2)
    ids = torch.randint(0, 128, (2, 32), generator=gen)
    labels = torch.randint(0, 128, (2, 32), generator=gen)
    loss = model(ids, labels=labels).float().mean()
    freed = None
    if monkeypatch_discards is not None:
        freed = [t.untyped_storage().nbytes() for t in monkeypatch_discards]
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, freed


def _with_discard_log():
    """Wrap ``discard_until_backward`` to collect the tensors it frees."""
    from megatron_lasp.ops import fused as F

    log, original = [], F.discard_until_backward

    def logged(out, consumer):
        done = original(out, consumer)
        if done:
            log.append(out)
        return done

    F.discard_until_backward = logged
    return log, lambda: setattr(F, "discard_until_backward", original)


def _recompute_rank(rank, world_size, fusion):
    from megatron.core import parallel_state as mpu

    from megatron_lasp.parallel import initialize_parallel

    if not mpu.model_parallel_is_initialized():
        initialize_parallel(1, 1, 1, seed=SEED)
    base = dict(fusion=fusion)
    out = {"plain": _model_grads(base)}
    log, undo = _with_discard_log()
    from megatron_lasp.ops.fused import recompute as R

    copy_into, copies = R._copy_into, []
    R._copy_into = lambda storage, values: (copies.append(values.shape), copy_into(storage, values))
    try:
        sel = dict(base, recompute_granularity="selective", recompute_modules=[], recompute_elementwise=True)
        out["elementwise"] = _model_grads(sel, log)
        out["discarded"], out["refilled_by_copy"] = len(log), len(copies)
        log.clear()
        sel_core = dict(sel, recompute_modules=["core_attn"])
        out["core_attn+elementwise"] = _model_grads(sel_core, log)
    finally:
        undo()
        R._copy_into = copy_into
    if fusion:
        out["unfused"] = _model_grads(dict(fusion=False))
    return out


def _assert_bitwise(a, b, what):
    assert a[0] == b[0], (what, a[0], b[0])
    for name in b[1]:
        assert torch.equal(a[1][name], b[1][name]), (what, name)


def _all_rank(rank, world_size):
    """One spawned process (interpreter on) for every CPU check: its start dominates the run time."""
    return {"ops": _ops_rank(rank, world_size), False: _recompute_rank(rank, world_size, False),
            True: _recompute_rank(rank, world_size, True)}


@pytest.fixture(scope="module")
def interpreter_results():
    (out,) = spawn(_all_rank, 1, env=INTERP)
    return out


@pytest.mark.parametrize("fusion", [False, True], ids=["torch-path", "fused-interpreter"])
def test_selective_elementwise_recompute_is_exact(interpreter_results, fusion):
    out = interpreter_results[fusion]
    # per layer: input norm, norm x gate, pre-MLP norm, GLU product; 2 layers
    assert out["discarded"] == 8
    # the fused kernels write the recomputed values into the freed storage; the torch path copies them
    assert out["refilled_by_copy"] == (0 if fusion else 8), out["refilled_by_copy"]
    for key in ("elementwise", "core_attn+elementwise"):
        assert out[key][2] is not None and all(n == 0 for n in out[key][2]), (key, out[key][2])
        _assert_bitwise(out[key], out["plain"], key)
    if fusion:
        loss, grads, _ = out["plain"]
        ref_loss, ref_grads, _ = out["unfused"]
        assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
        for name, ref in ref_grads.items():
            err = ((grads[name] - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            assert err < 1e-5, (name, err)


def test_recompute_flags_are_validated():
    from megatron_lasp.models import linear_lm_config
    from megatron_lasp.training.arguments import ArgumentError, parse_config

    with pytest.raises(ValueError, match="recompute_granularity selective"):
        linear_lm_config("tiny", use_cpu_initialization=True, recompute_elementwise=True)
    base = ["--model-preset", "tiny", "--mock-data", "--seq-length", "64", "--train-iters", "1"]
    with pytest.raises(ArgumentError, match="--recompute-granularity selective"):
        parse_config(base + ["--recompute-modules", "elementwise"])
    assert parse_config(base + ["--no-fusion"]).model.fusion is False
    assert parse_config(base).model.fusion is None


# ---------------------------------------------------------------------------------------------- GPU


def _gpu_cases():
    from megatron_lasp.ops import fused as F

    torch.manual_seed(SEED)
    s, b, H, D, h, f = 1024, 2, 16, 128, 2048, 5632
    return [
        ("rms_norm", lambda x, w: F.rms_norm(x, w, 1e-5), lambda x, w: F.rms_norm_ref(x, w, 1e-5),
         [torch.randn(s, b, h), 1 + 0.1 * torch.randn(h)]),
        ("qkv_features", lambda m: F.qkv_features(m, H, 4, D, True, True),
         lambda m: F.qkv_features_ref(m, H, 4, D, True, True), [torch.randn(s, b, H * 4 * D)]),
        ("norm_gate", lambda o, sg, w: F.norm_gate(o, sg, w, 1, 1e-5),
         lambda o, sg, w: F.norm_gate_ref(o, sg, w, 1, 1e-5),
         [torch.randn(b, s, H, D).transpose(0, 1), torch.rand(s, b, H, D), 1 + 0.1 * torch.randn(H * D)]),
        ("glu", lambda x: F.glu(x, False), lambda x: F.glu_ref(x, False), [torch.randn(s, b, 2 * f)]),
        ("swiglu", lambda x: F.glu(x, True), lambda x: F.glu_ref(x, True), [torch.randn(s, b, 2 * f)]),
    ]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_ops_on_gpu(dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, f, ref, inputs in _gpu_cases():
        out_err, grad_err = _compare(f, ref, inputs, device="cuda", dtype=dtype)
        assert out_err < tol and grad_err < tol, (name, dtype, out_err, grad_err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_recompute_refills_in_place_on_gpu(monkeypatch):
    """Each fused op's output, freed after its consumer (a matmul) and refilled in place before the
    consumer's backward, gives the gradients of the run that kept it, bit for bit, with no copy."""
    from megatron_lasp.ops import fused as F
    from megatron_lasp.ops.fused import recompute as R

    copies = []
    monkeypatch.setattr(R, "_copy_into", lambda storage, values: copies.append(values.shape))
    torch.manual_seed(0)
    s, b, H, D, f = 1000, 2, 4, 64, 384
    cases = [
        (lambda x, w, rc: F.rms_norm(x, w, 1e-5, recompute=rc),
         [torch.randn(s, b, H * D), 1 + 0.1 * torch.randn(H * D)]),
        (lambda o, sg, w, rc: F.norm_gate(o, sg, w, 1, 1e-5, recompute=rc),
         [torch.randn(b, s, H, D).transpose(0, 1), torch.rand(s, b, H, D), 1 + 0.1 * torch.randn(H * D)]),
        (lambda x, rc: F.glu(x, True, recompute=rc), [torch.randn(s, b, 2 * f)]),
    ]
    for op, inputs in cases:
        grads = {}
        for rc in (False, True):
            leaves = [t.to("cuda", torch.bfloat16).requires_grad_() for t in inputs]
            y = op(*leaves, rc)
            torch.manual_seed(1)
            w = torch.randn(y.shape[-1], 96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            z = y @ w
            if rc:
                assert F.discard_until_backward(y, z) and y.untyped_storage().nbytes() == 0
            z.float().square().sum().backward()
            grads[rc] = [t.grad for t in leaves] + [w.grad]
        for a, c in zip(grads[False], grads[True]):
            assert torch.equal(a, c)
    assert copies == []
