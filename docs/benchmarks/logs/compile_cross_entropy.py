# PYTHONPATH=[<triton 3.6.0 wheel dir>:].: python docs/benchmarks/logs/compile_cross_entropy.py   (on the CPU, 2026-12-07)
"""Compile the cross-entropy kernels for sm_90 with the installed Triton (through ptxas)."""
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
for name, types in cases.items():
    jf = triton.jit(getattr(K, name))
    names = jf.arg_names
    sig = {n: ("constexpr" if n == "BLOCK_V" else types[n]) for n in names}
    try:
        k = triton.compile(ASTSource(jf, sig, constexprs={(names.index("BLOCK_V"),): K.BLOCK_V}),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 2})
        print(name, "cubin", len(k.asm["cubin"]), "bytes", flush=True)
        if name == "_grad_kernel":
            ptx = k.asm["ptx"]
            print("  ex2 in ptx:", ptx.count("ex2"), " st.global:", ptx.count("st.global"), " ld.global:", ptx.count("ld.global"))
    except Exception as e:
        ok = False
        print(name, "FAILED", type(e).__name__, str(e)[:600])
print("ALL COMPILED" if ok else "SOME FAILED")
