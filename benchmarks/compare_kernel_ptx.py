"""Are the fixed-decay Triton kernels unchanged? Compare their PTX with an earlier commit's, on the CPU.

Compiles ``_local_state_kernel``, ``_scan_kernel`` and ``_chunk_kernel`` of the working tree (with
``GATED=False``) and of ``triton_chunk.py`` at ``--against`` (a git revision) for sm_90, for every
combination of direction, packed documents and input dtype (bf16 tensor-core dots; fp32 inputs
with ``tf32x3`` dots), at the launch configuration of B1 H16 D128,
and compares the instructions as multisets, with register numbers, labels, parameter
declarations / loads and debug lines left out (an added, unused kernel parameter renumbers those).
Equal multisets mean the same instructions: the same speed. Needs only Triton's compiler (no GPU).

    PYTHONPATH=. python benchmarks/compare_kernel_ptx.py --against f2714a2 --out docs/benchmarks/fixed_ptx_check.json
"""

import argparse
import importlib.util
import itertools
import json
import re
import subprocess
import sys
import tempfile

BF16 = "*bf16"
KERNELS = {
    "_local_state_kernel": (dict(Y=BF16, Z=BF16, LOC="*fp32", SLOPES="*fp32", DOC="*i32", GC="*fp32", SEGLOG="*fp32"),
                            dict(BT=64, BX=128, BZ=128, F32_DOT="tf32x3", EVEN=True), 8),
    "_scan_kernel": (dict(LOC="*fp32", INIT="*fp32", ENTRY="*fp32", FINAL="*fp32", SLOPES="*fp32", DOC="*i32",
                          SEGLOG="*fp32"), dict(BLOCK=1024, HAS_INIT=True, STORE_FINAL=True), 4),
    "_chunk_kernel": (dict(X=BF16, Y=BF16, Z=BF16, OUT=BF16, ENTRY="*fp32", SLOPES="*fp32", DOC="*i32", GC="*fp32"),
                      dict(BT=64, DXP=128, BZ=64, F32_DOT="tf32x3", EVEN=True, DOTS=False, DOT_SIGN=1.0,
                           SUM_BY_DOT=False), 4),
}


def _instructions(ptx: str):
    out = []
    for line in ptx.split("// -- End function")[0].splitlines():
        line = line.strip()
        if not line or line.startswith(("//", ".loc", ".file", ".param", "ld.param")):
            continue
        out.append(re.sub(r"%[a-z]+[0-9]+", "R", re.sub(r"\$L__\w+", "L", line)))
    return sorted(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", required=True, help="git revision whose triton_chunk.py is the baseline")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args()
    import triton

    from megatron_lasp.ops.lightning_attn import triton_chunk as new
    from megatron_lasp.testing import hopper_ptx

    text = subprocess.run(["git", "show", f"{args.against}:megatron_lasp/ops/lightning_attn/triton_chunk.py"],
                          check=True, capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location("megatron_lasp.ops.lightning_attn._baseline_triton_chunk", f.name)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    rows = []
    for (name, (types, consts, warps)), rev, doc, f32 in itertools.product(KERNELS.items(), (False, True),
                                                                           (False, True), (False, True)):
        if f32 and name == "_scan_kernel":
            continue  # no dots, no input dtype
        c = dict(consts, REVERSE=rev, HAS_DOC=doc, GATED=False, DOT_F32=f32)
        if f32:
            types = {k: ("*fp32" if v == BF16 else v) for k, v in types.items()}
        a = _instructions(hopper_ptx(getattr(old, name), types, c, warps))
        b = _instructions(hopper_ptx(getattr(new, name), types, c, warps))
        rows.append(dict(kernel=name, reverse=rev, documents=doc, fp32=f32, baseline_instructions=len(a),
                         instructions=len(b), same=a == b))
        print(f"{name:20s} reverse={rev!s:5s} documents={doc!s:5s} fp32={f32!s:5s} {len(a)} vs {len(b)} instructions: "
              f"{'same' if a == b else 'DIFFERENT'}", flush=True)
    meta = dict(command=" ".join(["python"] + sys.argv), triton=triton.__version__, target="sm_90 (PTX)",
                against=args.against)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows, all_same=all(r["same"] for r in rows)), f, indent=1)
    print("ALL SAME" if all(r["same"] for r in rows) else "SOME DIFFER")


if __name__ == "__main__":
    main()
