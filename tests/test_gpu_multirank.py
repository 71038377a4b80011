"""Every multi-rank path on a real GPU: several ranks share one GPU over gloo.

Skipped without CUDA; CI never runs them. NCCL refuses two ranks on one device, but gloo takes
CUDA tensors in its collectives, and the package stages its point-to-point (the LASP ring, the
chunked layer's state hop, megatron-core's pipeline exchange) through pinned host memory
(``megatron_lasp.parallel.comm``). So on a machine with one GPU::

    MEGATRON_LASP_GPU_REPORT=docs/benchmarks/gpu_multirank.json python -m pytest -m gpu tests/test_gpu_multirank.py -v

runs the GPU kernels (Triton) on 2 and 4 ranks. What is checked:

- the four sequence-parallel modes at SP = 2 and 4 against the one-rank run of the whole
  sequence, every case from a random initial state and with the final state (output, final state,
  dq, dk, dv and d(initial state): the first rank's gradient is the whole one, the others' exactly
  zero; the final state's gradient given in parts over the ranks), bf16 and fp32, at slice
  lengths that do not divide into the kernels' blocks; packed documents whose boundaries cross
  ranks; TP2 x SP2 (strided SP groups); each also with per-token gates instead of the fixed decay
  (``dg`` checked as well; packed: documents on slice edges, spanning ranks, of one token). The reference is the torch kernel in fp64 on the whole
  sequence; fp32 must agree to 1e-5; bf16 must be as close to it as the one-rank bf16 run of the
  same kernels (twice its error, + 1e-3);
- the whole-layer chunked recompute (``--recompute-chunk-size``) under lasp at SP = 2;
- training at TNL-1B width (2 layers, a 4096-id vocabulary), megatron-core DDP + distributed
  optimizer, bf16: DP = 2 and SP = 2 (lasp) each against DP = 1 with the same global batch,
  20 steps; resume at another DP size (2 -> 1 and 1 -> 2) against the uninterrupted run;
- the default GPU run over 2 ranks under ``torchrun`` (bundled corpus, save, resume).

The mode checks (``_run_case``) run on the CPU too, with the torch kernels, at a small shape
(``tests/test_sp_initial_state.py``), so their code path is exercised by the CPU suite.
"""

from __future__ import annotations

import math
import os
import random
import re
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from megatron_lasp.testing import spawn
from test_gpu import _chunked_vs_full, _rel, _report
from test_packed_sp import _boundary_sets
from test_sp_modes import MODES, _full_inputs, _slopes

pytestmark = pytest.mark.gpu

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOO = {"MEGATRON_LASP_DIST_BACKEND": "gloo"}
FP32_TOL = 1e-5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# ----------------------------------------------------------------------------------------------
# the modes against the one-rank run of the whole sequence


def _run_case(seed, shape, mode, dtype, group, cu=None, gated=False):
    """One case on this rank: relative errors against the fp64 one-rank run, of the SP run and
    of the one-rank run in ``dtype`` (the same Triton kernels, whole sequence), from a random fp32
    initial state ``h0``, with the final state (``output_final_state``; its gradient ``d_final``
    given to the ranks in unequal parts that sum to it). The SP run's d(h0) is summed over the
    group (the first rank holds the whole gradient, the others zeros: ``off_first_rank`` is the
    largest of theirs, over the group), so every rank returns the same numbers. ``gated``: per-token
    fp32 gates ``g`` (``testing.check_gates``: a head without decay, one whose carry underflows)
    instead of the fixed slopes, and their gradient ``dg`` checked too."""
    from megatron_lasp.ops.lightning_attn import TritonOptions, chunk_lightning_attn
    from megatron_lasp.parallel import gather_sequence, lightning_attn_sp, split_sequence
    from megatron_lasp.testing import check_gates

    B, C, H, D = shape
    world = dist.get_world_size(group)
    on_gpu = torch.cuda.is_available()  # (the CPU runs the same checks with the torch kernels)
    dev = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    kernel = "triton" if on_gpu else "torch"
    q, k, v, do = (x.to(dev) for x in _full_inputs(seed, B, C * world, H, D, D))
    gen = torch.Generator().manual_seed(seed + 1)
    h0, d_final = (torch.randn(B, H, D, D, generator=gen, dtype=torch.float64).to(dev) for _ in range(2))
    slopes = _slopes(H, True).to(dev)
    g = check_gates(seed + 2, B, C * world, H).to(dev) if gated else None
    cu = None if cu is None else cu.to(dev)

    def whole(dt, backend):
        leaves = [x.to(dt).clone().requires_grad_(True) for x in (q, k, v)]
        sdt = torch.float64 if dt == torch.float64 else torch.float32
        s0 = h0.to(sdt).clone().requires_grad_(True)
        gl = None if g is None else g.to(sdt).clone().requires_grad_(True)
        decay = None if gated else (slopes.to(dt) if dt == torch.float64 else slopes)
        o, final = chunk_lightning_attn(*leaves, decay, s0, True, backend=backend, cu_seqlens=cu, g=gl)
        torch.autograd.backward([o, final], [do.to(dt), d_final.to(final.dtype)])
        return [o.detach(), final.detach()] + [x.grad for x in leaves] + [s0.grad] + ([gl.grad] if gated else [])

    ref = whole(torch.float64, "torch")
    one = whole(dtype, kernel)
    local = [split_sequence(x.to(dtype), group).requires_grad_(True) for x in (q, k, v)]
    s0 = h0.float().clone().requires_grad_(True)
    g_local = None if g is None else split_sequence(g.float(), group).requires_grad_(True)
    o, final = lightning_attn_sp(*local, None if gated else slopes, group, mode=mode, backend=kernel,
                                 initial_state=s0, output_final_state=True, cu_seqlens=cu, g=g_local,
                                 triton_options=TritonOptions(poison_outputs=True))
    share = 2 * (dist.get_rank(group) + 1) / (world * (world + 1))
    torch.autograd.backward([o, final], [split_sequence(do.to(dtype), group), d_final.float() * share])
    off_first = torch.zeros((), device=dev) if dist.get_rank(group) == 0 else s0.grad.abs().max()
    dist.all_reduce(off_first, op=dist.ReduceOp.MAX, group=group)
    dh0 = s0.grad.clone()
    dist.all_reduce(dh0, group=group)  # the first rank's gradient: the others add zeros
    got = ([gather_sequence(o.detach(), group), final.detach()] + [gather_sequence(x.grad, group) for x in local]
           + [dh0] + ([gather_sequence(g_local.grad, group)] if gated else []))
    names = ("o", "final", "dq", "dk", "dv", "dh0", "dg")
    return {"sp": {n: _rel(a, b) for n, a, b in zip(names, got, ref)},
            "one_rank": {n: _rel(a, b) for n, a, b in zip(names, one, ref)},
            "sp_vs_one_rank": {n: _rel(a, b) for n, a, b in zip(names, got, one)},
            "off_first_rank": off_first.item()}


# slice lengths that are no multiple of the kernels' 64-token blocks; D 64 and 128
SHAPES = [(2, 1000, 4, 64), (1, 333, 4, 128)]
# the document layouts the per-token gates are checked with (of test_packed_sp's sets)
GATED_PACKED = ("slice-edges", "span-all-ranks", "len1-docs")


def _modes(rank, world_size, seed):
    group = dist.group.WORLD
    out = {}
    i = 0
    for dname, dtype in DTYPES.items():
        for shape in SHAPES:
            for mode in MODES:
                B, C, H, D = shape
                out[f"{mode}-{dname}-B{B}-C{C}-H{H}-D{D}-sp{world_size}"] = _run_case(seed + i, shape, mode, dtype, group)
                i += 1
        # packed documents: boundaries on slice edges, one token either side, across all ranks
        B, C, H, D = SHAPES[0]
        sets = _boundary_sets(world_size, C, B, random.Random(seed))
        for name, cu in sets.items():
            for mode in MODES:
                out[f"{mode}-{dname}-packed-{name}-sp{world_size}"] = _run_case(seed + i, SHAPES[0], mode, dtype, group, cu)
                i += 1
        # per-token gates (dg too): both shapes, and documents across the ranks
        for mode in MODES:
            for B, C, H, D in SHAPES:
                key = f"{mode}-{dname}-gated-B{B}-C{C}-H{H}-D{D}-sp{world_size}"
                out[key] = _run_case(seed + i, (B, C, H, D), mode, dtype, group, gated=True)
                i += 1
            for name in GATED_PACKED:
                out[f"{mode}-{dname}-gated-packed-{name}-sp{world_size}"] = _run_case(
                    seed + i, SHAPES[0], mode, dtype, group, sets[name], gated=True)
                i += 1
    return out


def _strided(rank, world_size, seed):
    """TP2 x SP2 on 4 ranks: SP groups {0, 2} and {1, 3}, each on its own sequence."""
    from megatron_lasp.parallel import initialize_parallel

    groups = initialize_parallel(2, 2, 1)
    assert dist.get_process_group_ranks(groups.cp) == [rank % 2, rank % 2 + 2]
    out = {}
    for i, mode in enumerate(MODES):
        for dname, dtype in DTYPES.items():
            out[f"{mode}-{dname}-tp2-sp2"] = _run_case(seed + 7 * (rank % 2) + i, SHAPES[0], mode, dtype, groups.cp)
            out[f"{mode}-{dname}-gated-tp2-sp2"] = _run_case(seed + 7 * (rank % 2) + i + 50, SHAPES[0], mode, dtype,
                                                             groups.cp, gated=True)
    return out


def _check_cases(results: dict) -> list:
    """The cases that fail: fp32 SP error >= 1e-5; bf16 SP error > 2 x one-rank bf16 error + 1e-3;
    a d(initial state) off the group's first rank that is not zero."""
    bad = []
    for key, r in results.items():
        if r["off_first_rank"] != 0.0:
            bad.append((key, "dh0 off the first rank", r))
        for name, err in r["sp"].items():
            if "-fp32-" in key + "-":
                ok = err < FP32_TOL
            else:
                ok = err <= 2 * r["one_rank"][name] + 1e-3
            if not (ok and math.isfinite(err)):
                bad.append((key, name, r))
    return bad


def _summary(results: dict) -> dict:
    worst = {}
    for key, r in results.items():
        d = "bf16" if "-bf16-" in key else "fp32"
        for n, e in r["sp"].items():
            worst[f"{d}/{n}"] = max(worst.get(f"{d}/{n}", 0.0), e)
    return {"max_sp_rel_err": worst, "cases": len(results)}


@requires_cuda
@pytest.mark.parametrize("world", [2, 4], ids=["sp2", "sp4"])
def test_every_mode_on_shared_gpu(world):
    seed = random.randrange(1 << 20)
    t0 = time.time()
    per_rank = spawn(_modes, world, (seed,), timeout=600)
    results = per_rank[0]
    for other in per_rank[1:]:  # gathered results: every rank holds the same numbers
        assert other.keys() == results.keys()
    _report(f"modes/sp{world}", dict(_summary(results), seed=seed, seconds=time.time() - t0, results=results))
    assert len(results) == 2 * (2 * len(SHAPES) + 7 + len(GATED_PACKED)) * len(MODES)
    assert sum("-gated-" in key for key in results) == 2 * (len(SHAPES) + len(GATED_PACKED)) * len(MODES)
    bad = _check_cases(results)
    assert not bad, bad[:4]


@requires_cuda
def test_strided_tp2_sp2_on_shared_gpu():
    seed = random.randrange(1 << 20)
    per_rank = spawn(_strided, 4, (seed,), timeout=600)
    results = {f"rank{r}/{k}": v for r, res in enumerate(per_rank) for k, v in res.items()}
    _report("modes/tp2-sp2", dict(_summary(results), seed=seed, results=results))
    assert len(results) == 4 * 2 * 2 * len(MODES)
    bad = _check_cases(results)
    assert not bad, bad[:4]


# ----------------------------------------------------------------------------------------------
# the chunked layer's state hop (lasp, SP = 2)


@requires_cuda
def test_chunked_recompute_lasp_sp2_on_shared_gpu():
    record = spawn(_chunked_vs_full, 2, (2,), timeout=600, init_process_group=False, env=GLOO)[0]
    _report("long-context/chunked-vs-full-lasp-sp2-shared-gpu", record)
    # as tests/test_gpu.py: the chunks change only the order of bf16 sums
    for what in ("loss", "grad_norm"):
        got, want = record["chunked"][what], record["full"][what]
        assert len(got) == len(want) == 3 and all(math.isfinite(x) for x in got), record
        assert abs(got[0] - want[0]) <= 5e-3 * abs(want[0]), record
        assert all(abs(g - w) <= 5e-2 * abs(w) for g, w in zip(got, want)), record


# ----------------------------------------------------------------------------------------------
# training: DP, SP, PP against one rank; resume at another DP size

STEPS = 20
TRAIN = [
    "--model-preset", "tnl-1b", "--num-layers", "2", "--mock-data", "--vocab-size", "4095",
    "--seq-length", "4096", "--micro-batch-size", "1", "--global-batch-size", "2",
    "--train-iters", str(STEPS), "--seed", "7", "--lr", "3e-4", "--lr-warmup-iters", "2",
    "--log-interval", "1", "--eval-interval", "0", "--bf16", "--ddp-impl", "megatron",
    "--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable", "--distributed-backend", "gloo",
]
LAYOUTS = {
    "dp2": [],
    "sp2": ["--sequence-parallel-size", "2", "--sequence-parallel-mode", "lasp"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
}
# PP initializes each stage's weights from its own RNG state, so PP = 2 cannot start from DP = 1's
# initial weights: it resumes DP = 1's checkpoint of step 10 (weights and optimizer state) and is
# compared with DP = 1's steps 11-20. (A fine-tune with a fresh optimizer would not do: Adam's first
# step moves every weight by about the learning rate whatever its gradient's size, so the bf16
# rounding of near-zero gradients decides the direction of many updates.)
REFERENCE = {"dp2": "dp1", "sp2": "dp1", "pp2": "dp1"}
SAVE_AT = 10
START = {"dp2": 0, "sp2": 0, "pp2": SAVE_AT}


def _history(state) -> dict:
    return {"loss": list(state.losses), "grad_norm": list(state.grad_norms)}


def _train(rank, world_size, runs: dict) -> dict:
    """Each named run (flags after TRAIN) in this process, one after the other."""
    from megatron_lasp.training import main

    out = {}
    for name, extra in runs.items():
        t0 = time.time()
        out[name] = dict(_history(main(TRAIN + extra, destroy=False)), seconds=time.time() - t0)
    return out


def _save_args(root, name):
    return ["--save", os.path.join(root, name), "--save-interval", str(SAVE_AT), "--exit-interval", str(SAVE_AT)]


def _resume_args(root, name):
    return ["--load", os.path.join(root, name)]


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """One-rank runs (reference, a reordered reference for the bf16 noise, a save at DP = 1, the
    resume of the DP = 2 save), two-rank runs (DP = 2, SP = 2, the save at DP = 2, the resume of the
    DP = 1 save); PP = 2 (resuming the DP = 1 save) in its own spawn (a failure there does not hide
    the others)."""
    return _training_runs(str(tmp_path_factory.mktemp("train")))


def _training_runs(root: str) -> dict:
    out = {}
    t0 = time.time()
    try:
        out.update(spawn(_train, 1, ({
            "dp1": [],
            "dp1-reordered": ["--cross-entropy-chunk-size", "1000"],
            "dp1-save": _save_args(root, "from-dp1"),
        },), timeout=900, init_process_group=False)[0])
        out.update(spawn(_train, 2, ({
            "dp2": LAYOUTS["dp2"],
            "sp2": LAYOUTS["sp2"],
            "dp2-save": _save_args(root, "from-dp2"),
            "dp1-to-dp2": _resume_args(root, "from-dp1"),
        },), timeout=900, init_process_group=False)[0])
        out.update(spawn(_train, 1, ({"dp2-to-dp1": _resume_args(root, "from-dp2")},), timeout=600,
                         init_process_group=False)[0])
    except AssertionError as e:
        out["error"] = str(e)
    try:
        out.update(spawn(_train, 2, ({"pp2": LAYOUTS["pp2"] + _resume_args(root, "from-dp1")},), timeout=600,
                         init_process_group=False)[0])
    except AssertionError as e:
        out["pp2-error"] = str(e)
    out["seconds"] = time.time() - t0
    _report("train/shared-gpu-runs", out)
    return out


def _max_rel(got, want):
    return max(abs(g - w) / abs(w) for g, w in zip(got, want))


def _max_abs(got, want):
    return max(abs(g - w) for g, w in zip(got, want))


# bf16 tolerance. The runs compute the same function in another order: bf16 activations and
# weights round differently (~2^-8 relative per element) and training amplifies the difference
# step by step. Step 1 (the same weights) must agree to 2e-3 (loss) / 2e-2 (grad norm), far below
# what a missing gradient reduction (2x) or a dropped state changes. The noise is measured in the
# same session: DP = 1 against DP = 1 with another loss-chunk order (the same function, other sums).
# - Losses, every step, absolute: the mock data is memorized (the loss falls from ~8.7 to ~0.01 in
#   20 steps), so a relative difference of late steps means nothing; allowed: 5 times the noise, and
#   at least 1% of the first step's loss.
# - Grad norms, the first NORM_STEPS steps of a comparison, relative: in the fast descent (steps 4-6)
#   the norms spike and Adam turns bf16 differences of near-zero gradients into different updates,
#   so later norms of any two runs drift apart; allowed: 5 times the noise over the same steps, and
#   at least 2e-2.
NORM_STEPS = 5


def _tolerance(training):
    """``(loss tolerance (absolute), grad-norm tolerance (relative))``. Every comparison starts from
    the same weights (step 1, or the resumed step 11), as the noise run does at step 1: its grad-norm
    noise is taken over its own first NORM_STEPS steps."""
    ref, noise = training["dp1"], training["dp1-reordered"]
    return (max(5 * _max_abs(noise["loss"], ref["loss"]), 1e-2 * ref["loss"][0]),
            max(5 * _max_rel(noise["grad_norm"][:NORM_STEPS], ref["grad_norm"][:NORM_STEPS]), 2e-2))


def _compare(got, want, training, start):
    """The record of ``got`` (a run's history) against ``want``'s steps from ``start`` on."""
    want = {k: want[k][start:] for k in ("loss", "grad_norm")}
    loss_tol, norm_tol = _tolerance(training)
    return {"first_step_loss_rel": _max_rel(got["loss"][:1], want["loss"][:1]),
            "first_step_grad_norm_rel": _max_rel(got["grad_norm"][:1], want["grad_norm"][:1]),
            "loss_max_abs": _max_abs(got["loss"], want["loss"]),
            "grad_norm_max_rel": _max_rel(got["grad_norm"][:NORM_STEPS], want["grad_norm"][:NORM_STEPS]),
            "loss_tol_abs": loss_tol, "grad_norm_tol_rel": norm_tol, "got": got, "want": want}


@requires_cuda
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_layout_matches_one_rank(layout, training):
    key = "pp2-error" if layout == "pp2" else "error"
    assert key not in training, training.get(key)
    got, start = training[layout], START[layout]
    assert len(got["loss"]) == STEPS - start, training
    assert all(math.isfinite(x) for x in got["loss"] + got["grad_norm"]), got
    record = _compare(got, training[REFERENCE[layout]], training, start)
    _report(f"train/{layout}-vs-{REFERENCE[layout]}", record)
    assert record["first_step_loss_rel"] <= 2e-3 and record["first_step_grad_norm_rel"] <= 2e-2, record
    assert record["loss_max_abs"] <= record["loss_tol_abs"], record
    assert record["grad_norm_max_rel"] <= record["grad_norm_tol_rel"], record


@requires_cuda
@pytest.mark.parametrize("change", ["dp2-to-dp1", "dp1-to-dp2"])
def test_resume_at_another_dp_size(change, training):
    """Saved at step 10 at one DP size, resumed at the other: the continued run is the
    uninterrupted run of the saving layout (step 11: the same weights, only the loss sums'
    order differs; later steps: the optimizer state was resharded right)."""
    assert "error" not in training, training.get("error")
    saved = change.split("-to-")[0]
    want = training[saved]
    got = training[change]
    assert len(got["loss"]) == STEPS - SAVE_AT, got
    assert _max_rel(training[saved + "-save"]["loss"], want["loss"][:SAVE_AT]) <= 1e-5, "the saving run is not the uninterrupted one"
    record = _compare(got, want, training, SAVE_AT)
    _report(f"resume/{change}", record)
    assert record["first_step_loss_rel"] <= 1e-4, record
    assert record["loss_max_abs"] <= record["loss_tol_abs"], record
    assert record["grad_norm_max_rel"] <= record["grad_norm_tol_rel"], record


# ----------------------------------------------------------------------------------------------
# torchrun: the default GPU path on 2 ranks of one GPU, bundled corpus, save, resume


@pytest.fixture(scope="module")
def corpus_prefix(tmp_path_factory):
    """The bundled corpus tokenized (``$MEGATRON_LASP_CORPUS_PREFIX``: already tokenized there)."""
    given = os.environ.get("MEGATRON_LASP_CORPUS_PREFIX")
    if given:
        return given
    from megatron_lasp.data import preprocess_bundled_corpus

    return preprocess_bundled_corpus(str(tmp_path_factory.mktemp("data") / "corpus"))


def _torchrun(args, cwd):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           os.path.join(REPO, "pretrain_linear_lm.py")] + args
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("iteration")]


@requires_cuda
def test_torchrun_two_ranks_one_gpu_save_resume(corpus_prefix, tmp_path):
    save = tmp_path / "run"
    args = ["--distributed-backend", "gloo", "--model-preset", "tnl-1b", "--num-layers", "2",
            "--sequence-parallel-size", "2", "--sequence-parallel-mode", "lasp",
            "--data-path", corpus_prefix, "--split", "98,2,0", "--data-cache-path", str(tmp_path / "cache"),
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", os.path.join(REPO, "examples/data/tokenizer"),
            "--seq-length", "2048", "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "8",
            "--lr", "3e-4", "--lr-warmup-iters", "2", "--log-interval", "1", "--eval-interval", "4", "--eval-iters", "1",
            "--save", str(save), "--save-interval", "4"]
    t0 = time.time()
    first = _torchrun(args + ["--exit-interval", "4"], str(tmp_path))
    resumed = _torchrun(args + ["--load", str(save)], str(tmp_path))

    def losses(lines):
        return {int(m.group(1)): float(m.group(2)) for m in
                (re.search(r"iteration\s+(\d+)/\s*\d+ .*?lm loss: ([0-9.Ee+-]+)", ln) for ln in lines) if m}

    a, b = losses(first), losses(resumed)
    _report("torchrun/sp2-one-gpu-save-resume", {"first": a, "resumed": b, "seconds": time.time() - t0})
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [5, 6, 7, 8], (first, resumed)
    assert all(math.isfinite(x) for x in list(a.values()) + list(b.values()))
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "8"
