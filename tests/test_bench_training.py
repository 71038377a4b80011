"""benchmarks/bench_training.py: kernel classification and the trace breakdown (no GPU needed)."""

from __future__ import annotations

import importlib.util
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_training", os.path.join(REPO, "benchmarks", "bench_training.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_classify_kernel_names():
    b = _bench()
    attn, fused = b._triton_names()
    assert "_chunk_kernel" in attn and "_rms_fwd_kernel" in fused
    cases = {
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", ""): "matmul",
        ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NTT", "loss"): "matmul",
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", ""): "communication",
        ("_chunk_kernel", ""): "lightning_attn",
        ("_ng_bwd_kernel", ""): "fused_triton",
        ("triton_poi_fused_add_0", ""): "other_triton",
        ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", ""): "elementwise",
        ("void at::native::vectorized_elementwise_kernel<4, at::native::exp_kernel_cuda>", "loss"): "loss",
        ("void at::native::multi_tensor_apply_kernel<AdamFunctor>", "optimizer"): "optimizer",
        ("void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda>", ""): "copies",
        ("void at::native::reduce_kernel<512, 1, ReduceOp<float, MeanOps>>", ""): "elementwise",
    }
    for (name, scope), want in cases.items():
        assert b.classify(name, scope, attn, fused) == want, (name, scope)


def test_breakdown_from_trace_scopes_kernels_by_their_launch(tmp_path):
    b = _bench()
    ev = [
        {"ph": "X", "cat": "user_annotation", "name": "lasp::optimizer", "ts": 100, "dur": 50, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "autograd::engine::evaluate_function: _VocabParallelCrossEntropyBackward",
         "ts": 10, "dur": 20, "tid": 2},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 120, "dur": 1, "tid": 1, "args": {"correlation": 1}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 15, "dur": 1, "tid": 2, "args": {"correlation": 2}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 15, "dur": 1, "tid": 1, "args": {"correlation": 3}},
        {"ph": "X", "cat": "kernel", "name": "multi_tensor_apply_kernel", "ts": 200, "dur": 4000, "args": {"correlation": 1}},
        {"ph": "X", "cat": "kernel", "name": "vectorized_elementwise_kernel", "ts": 300, "dur": 2000, "args": {"correlation": 2}},
        {"ph": "X", "cat": "kernel", "name": "vectorized_elementwise_kernel", "ts": 400, "dur": 1000, "args": {"correlation": 3}},
        {"ph": "X", "cat": "gpu_memset", "name": "Memset (Device)", "ts": 500, "dur": 500, "args": {"correlation": 9}},
        # the fused linear cross-entropy's forward: its elementwise kernels are loss, its matmuls matmul
        {"ph": "X", "cat": "cpu_op", "name": "_LinearCrossEntropy", "ts": 600, "dur": 20, "tid": 3},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 605, "dur": 1, "tid": 3, "args": {"correlation": 4}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 610, "dur": 1, "tid": 3, "args": {"correlation": 5}},
        {"ph": "X", "cat": "kernel", "name": "elementwise_kernel<128, 2, gpu_kernel_impl_nocast>", "ts": 700, "dur": 3000,
         "args": {"correlation": 4}},
        {"ph": "X", "cat": "kernel", "name": "nvjet_sm90_tst_192x192_64x4_1x2_h_bz_coopB_TNN", "ts": 800, "dur": 6000,
         "args": {"correlation": 5}},
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": ev}))
    got = b.breakdown_from_trace(str(path), steps=2)["gpu_ms_per_step"]
    assert got["optimizer"] == 2.0 and got["loss"] == 2.5 and got["elementwise"] == 0.5 and got["copies"] == 0.25
    assert got["matmul"] == 3.0
