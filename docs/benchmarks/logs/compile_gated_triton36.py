# PYTHONPATH=<triton 3.6.0 wheel dir>:. python docs/benchmarks/logs/compile_gated_triton36.py   (on the CPU, 2026-12-07)
"""Compile the gated kernels (DOTS on) for sm_90 with the installed Triton, through ptxas (cubin)."""
import itertools, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, "benchmarks")
from compare_kernel_ptx import KERNELS, BF16
from megatron_lasp.ops.lightning_attn import triton_chunk as new
print("triton", triton.__version__, triton.__file__)
extra = {"W": BF16, "DOT_OUT": "*fp32"}
ok = True
for (name, (types, consts, warps)), rev, doc, f32, dots in itertools.product(KERNELS.items(), (False, True), (False, True), (False, True), (False, True)):
    if name != "_chunk_kernel" and dots:
        continue
    if f32 and name == "_scan_kernel":
        continue
    types = dict(types, **(extra if name == "_chunk_kernel" else {}))
    c = dict(consts, REVERSE=rev, HAS_DOC=doc, GATED=True, DOT_F32=f32)
    if name == "_chunk_kernel":
        c.update(DOTS=dots, DOT_SIGN=-1.0 if rev else 1.0, SUM_BY_DOT=False)
    if f32:
        types = {k: ("*fp32" if v == BF16 else v) for k, v in types.items()}
    jf = triton.jit(getattr(new, name))
    names = jf.arg_names
    cc = {k: v for k, v in c.items() if k in names}
    sig = {n: ("constexpr" if n in cc else types.get(n, "i32")) for n in names}
    try:
        k = triton.compile(ASTSource(jf, sig, constexprs={(names.index(a),): v for a, v in cc.items()}),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 2})
        n = len(k.asm["cubin"])
        print(f"{name} rev={rev} doc={doc} f32={f32} dots={dots}: cubin {n} bytes, regs {getattr(k, 'n_regs', '?')} spills {getattr(k, 'n_spills', '?')}", flush=True)
    except Exception as e:
        ok = False
        print(f"{name} rev={rev} doc={doc} f32={f32} dots={dots}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
print("ALL COMPILED" if ok else "SOME FAILED")
