# PYTHONPATH=[<triton 3.6.0 wheel dir>:].: python docs/benchmarks/logs/compile_cross_entropy.py   (on the CPU, 2026-12-07)
"""Compile the cross-entropy kernels for sm_90 with the installed Triton (through ptxas)."""
import itertools

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from megatron_lasp.ops.cross_entropy import kernels as K
print("triton", triton.__version__, triton.__file__)
ok = True
cases = {
    "_row_stats_kernel": {"L": "*fp32", "TGT": "*i64", "M": "*fp32", "S": "*fp32", "TLOG": "*fp32", "V": "i32", "sl": "i32", "vocab_start": "i32"},
    "_grad_kernel": {"L": "*fp32", "LSE": "*fp32", "TGT": "*i64", "SCALE": "*fp32", "G": "*bf16", "V": "i32", "sl": "i32", "sg": "i32", "vocab_start": "i32"},
}
for (block_v, warps), (name, types) in itertools.product(((2048, 4), (4096, 8), (8192, 16)), cases.items()):
    jf = triton.jit(getattr(K, name))
    names = jf.arg_names
    sig = {n: ("constexpr" if n == "BLOCK_V" else types[n]) for n in names}
    try:
        k = triton.compile(ASTSource(jf, sig, constexprs={(names.index("BLOCK_V"),): block_v}),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 2})
        print(f"{name} {block_v}x{warps}: cubin {len(k.asm['cubin'])} bytes", flush=True)
    except Exception as e:
        ok = False
        print(name, f"{block_v}x{warps}", "FAILED", type(e).__name__, str(e)[:600])
print("ALL COMPILED" if ok else "SOME FAILED")
