"""The whole-layer chunked recompute (``--recompute-chunk-size``) of Gated DeltaNet layers.

On one rank each chunk of a Gated DeltaNet layer starts from the delta-rule state and the
convolution's last ``K - 1`` inputs left by the chunk before (``models/chunked.py``,
``GatedDeltaNet.carrying``). The loss and every parameter gradient must equal the plain run's
(fp32 round-off), with chunks shorter than the convolution's reach, chunks that do not divide the
sequence, and packed documents starting on, next to and inside chunks; on a rank of a
sequence-parallel group the layer runs whole and only the MLP in chunks (equal to the one-rank
run too). Also: the training log's model line names the layer kinds.
"""

from __future__ import annotations

import pytest
import torch

from megatron_lasp.testing import spawn
from test_delta_net_model import SHAPED, _check_sharded, _config, _sharded

# (id, tp, sp, mode, tp-sp, config): chunks of 2 are shorter than the convolution's 3-token reach, of 3 as long
ONE_RANK = [(f"chunk{n}", 1, 1, "lasp", False, dict(recompute_chunk_size=n)) for n in (2, 3, 5, 16)]
SP2 = [(f"sp2-{mode}-chunk5", 1, 2, mode, False, dict(recompute_chunk_size=5)) for mode in ("lasp", "lasp2")]


def _paths(rank, world_size):
    """Which chunked path each layer takes: the whole layer with its state on one rank, the MLP
    only on a sequence-parallel rank."""
    from megatron_lasp.models import build_linear_lm
    from megatron_lasp.parallel import initialize_parallel

    out = {}
    for sp in (1, 2):
        if sp > world_size:
            continue
        initialize_parallel(1, sp, 1, seed=0)
        model = build_linear_lm(_config(context_parallel_size=sp, recompute_chunk_size=4), 128)
        out[sp] = [layer.chunks_whole_layer() for layer in model.decoder.layers]
    return out


def test_gated_delta_net_carries_its_state_on_one_rank_only():
    paths = spawn(_paths, 2)[0]
    assert paths == {1: [True, True], 2: [False, False]}, paths


@pytest.mark.parametrize("docs", [False, True], ids=["rows", "docs"])
def test_chunked_recompute_equals_the_plain_run(docs):
    _check_sharded(spawn(_sharded, 1, args=(ONE_RANK, docs), timeout=600), ONE_RANK, meta=False)


def test_chunked_recompute_under_sequence_parallelism_equals_one_rank():
    _check_sharded(spawn(_sharded, 2, args=(SP2, True), timeout=600), SP2, meta=False)


def test_the_startup_line_names_the_layers():
    """The training log's model line: layers by kind, width, parameters."""
    from megatron_lasp.models import linear_lm_config
    from megatron_lasp.training.startup import describe_model

    module = torch.nn.Linear(10, 10)  # 110 parameters
    gdn = linear_lm_config("tiny", **SHAPED, hybrid_layer_pattern="L*", num_query_groups=2)
    assert describe_model(gdn, [module, module]) == (
        "2 layers (1 gated_delta_net (2 key / 4 value heads, conv 4), 1 softmax), hidden 64, 0.00M parameters "
        "on this rank")
    gated = linear_lm_config("tiny", linear_attention_gate="mamba2")
    assert describe_model(gated, torch.nn.Linear(1000, 1000)) == (
        "2 layers (2 lightning (mamba2 gate)), hidden 64, 1.00M parameters on this rank")


def _gpu_chunked_vs_full(rank, world_size):
    """GDN-1B width, 2 layers, 8K tokens, bf16 on the GPU (fla's kernels): megatron-core's full
    recompute against the whole-layer chunks (3000 tokens: the convolution tail and the state
    cross chunk edges that are not multiples of fla's 64-token blocks)."""
    from megatron_lasp.training import main

    base = ["--model-preset", "gdn-1b", "--num-layers", "2", "--mock-data", "--seq-length", "8192",
            "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "3", "--seed", "7",
            "--lr", "3e-4", "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-interval", "0", "--bf16",
            "--ddp-impl", "megatron", "--use-distributed-optimizer", "--recompute-granularity", "full"]
    full = main(base, destroy=False)
    chunked = main(base + ["--recompute-chunk-size", "3000"], destroy=False)
    return {"full": {"loss": full.losses, "grad_norm": full.grad_norms},
            "chunked": {"loss": chunked.losses, "grad_norm": chunked.grad_norms}}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_chunks_train_like_full_recompute():
    import math

    from test_gpu import _report

    record = spawn(_gpu_chunked_vs_full, 1, timeout=600, init_process_group=False)[0]
    _report("gated-delta-net/chunked-vs-full", record)
    # the chunks change only the order of bf16 sums: the first step agrees to bf16 accuracy
    for what in ("loss", "grad_norm"):
        got, want = record["chunked"][what], record["full"][what]
        assert len(got) == len(want) == 3 and all(math.isfinite(x) for x in got), record
        assert abs(got[0] - want[0]) <= 5e-3 * abs(want[0]), record
        assert all(abs(g - w) <= 5e-2 * abs(w) for g, w in zip(got, want)), record
