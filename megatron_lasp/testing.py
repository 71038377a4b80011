"""Run a function on N spawned gloo ranks inside a test, and the inputs and error measure of the
sequence-parallel checks (the CPU tests and ``benchmarks/gpu_check_sp.py`` share them).

    from megatron_lasp.testing import spawn

    def _check(rank, world_size, n):      # module-level, so spawned processes can import it
        ...                               # torch.distributed is initialised (gloo) here
        return some_picklable_value

    def test_something():
        results = spawn(_check, world_size=2, args=(3,))   # one return value per rank

Each rank gets torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT`` on a free port). If any rank raises, dies or the whole run exceeds ``timeout``,
the other ranks are killed and an ``AssertionError`` carries the failing ranks' tracebacks.

On a machine with CUDA each rank's current device is ``rank % device_count``: the ranks share the
GPUs over gloo (``megatron_lasp.parallel.state.local_device``), so a test can spawn more ranks than
there are GPUs.

:func:`hopper_ptx` compiles a Triton kernel function for sm_90 without a GPU (the compile tests and
``benchmarks/compare_kernel_ptx.py``); :func:`number_docs_corpus` writes a small packed-documents
corpus for training tests.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable, Sequence

import torch.multiprocessing as mp


_CHILD_WARNING_FILTERS = "ignore::UserWarning,ignore::DeprecationWarning,ignore::FutureWarning"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, args, results, env, init_process_group, timeout):
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        import torch.distributed as dist

        if init_process_group:
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
            import torch

            if torch.cuda.is_available():
                from megatron_lasp.parallel.state import local_device

                torch.cuda.set_device(local_device("gloo", rank, torch.cuda.device_count()))
        value = fn(rank, world_size, *args)
        results.put((rank, True, value))
    except BaseException:  # report everything, including assertion failures, to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:
            pass
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    timeout: float = 240.0,
    env: dict[str, str] | None = None,
    init_process_group: bool = True,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes.

    Args:
        fn: a module-level function (it is pickled by name).
        world_size: number of ranks.
        args: extra picklable arguments.
        timeout: seconds for the whole run (process start and imports included).
        env: extra environment variables for the ranks.
        init_process_group: initialise the default gloo group before calling ``fn``.

    Returns:
        The return values of ``fn``, indexed by rank.

    Raises:
        AssertionError: with each failing rank's traceback, when a rank raises, exits without
            reporting, or the run times out.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    # Children inherit the environment at start; their imports (megatron-core's "TE/Apex not
    # installed" notices) happen before any code of ours runs, so filter through PYTHONWARNINGS.
    saved_warnings = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = _CHILD_WARNING_FILTERS
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, port, tuple(args), results, dict(env or {}), init_process_group, timeout),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    try:
        for p in procs:
            p.start()
    finally:
        if saved_warnings is None:
            del os.environ["PYTHONWARNINGS"]
        else:
            os.environ["PYTHONWARNINGS"] = saved_warnings
    values: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) + len(failures) < world_size:
            try:
                rank, ok, value = results.get(timeout=0.5)
            except queue.Empty:
                for rank, p in enumerate(procs):
                    if rank not in values and rank not in failures and p.exitcode not in (None, 0):
                        # give a dying rank's message a moment to arrive before calling it silent
                        time.sleep(0.5)
                        if results.empty():
                            failures[rank] = f"process exited with code {p.exitcode} without reporting"
                if failures or time.monotonic() > deadline:
                    break
                continue
            (values if ok else failures)[rank] = value
            if failures:
                break
    finally:
        if failures or len(values) < world_size:
            for p in procs:
                if p.is_alive():
                    p.kill()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    if failures:
        report = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
        raise AssertionError(f"{fn.__name__} failed on {len(failures)} of {world_size} ranks:\n{report}")
    if len(values) < world_size:
        missing = sorted(set(range(world_size)) - set(values))
        raise AssertionError(f"{fn.__name__} timed out after {timeout:.0f}s; ranks {missing} did not finish")
    return [values[r] for r in range(world_size)]


# ----------------------------------------------------------------------------------------------
# inputs and errors of the sequence-parallel checks


def check_slopes(H: int, *, zero_head: bool = False, strong_head: bool = False):
    """ALiBi-like decay slopes ``[H]`` fp32 (``2^(-8 (h+1) / H)``) for the parity checks.

    Args:
        zero_head: head 0 without decay (a state that leaks across a document boundary cannot
            hide behind underflow there).
        strong_head: the last head's slope 5.0 (``lam^C`` underflows to 0 in fp32).
    """
    import torch

    s = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])
    if zero_head:
        s[0] = 0.0
    if strong_head:
        s[-1] = 5.0
    return s


def rel_err(a, b) -> float:
    """Relative Frobenius error ``|a - b| / |b|`` in fp64; inf when ``a`` is not finite."""
    import torch

    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def attention_inputs(seed: int, B: int, T: int, H: int, Dk: int, Dv: int):
    """``(q, k, v, do)`` fp64 on the CPU: ``[B, T, H, Dk]`` q, k scaled by ``Dk^-0.5``, ``[B, T, H, Dv]`` v, do."""
    import torch

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, Dk, generator=g, dtype=torch.float64) * Dk ** -0.5
    k = torch.randn(B, T, H, Dk, generator=g, dtype=torch.float64) * Dk ** -0.5
    v = torch.randn(B, T, H, Dv, generator=g, dtype=torch.float64)
    do = torch.randn(B, T, H, Dv, generator=g, dtype=torch.float64)
    return q, k, v, do


def edge_cu_seqlens(B: int, W: int, C: int, seed: int):
    """Global document starts (int32 ``[N + 1]``, CPU) over the ``B W C`` tokens of ``B`` rows of
    ``W`` slices of ``C``: on every slice edge and one token after it, a document over every rank,
    length-1 documents, random starts, and starts at and near each row's beginning."""
    import torch

    T = W * C
    g = torch.Generator().manual_seed(seed)
    cuts = [j * C for j in range(1, W)] + [j * C + 1 for j in range(1, W)] + [C // 2, C // 2 + 1, T - 1]
    cuts += torch.randint(1, B * T, (4 * W,), generator=g).tolist()
    cuts += [b * T + c for b in range(1, B) for c in (0, 5)]
    cu = sorted(set(c for c in cuts if 0 < c < B * T) | {0, B * T})
    return torch.tensor(cu, dtype=torch.int32)


def check_gates(seed: int, B: int, T: int, H: int):
    """Per-token log-decays ``g [B, T, H]`` fp64 (``<= 0``) for the parity checks: head 0 without
    decay (a leak across a document boundary cannot hide), the last head strong (its carry
    underflows), the others ``-0.3 softplus(N(0, 1))``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    g = -torch.nn.functional.softplus(torch.randn(B, T, H, generator=gen, dtype=torch.float64)) * 0.3
    g[..., 0] = 0.0
    g[..., -1] = g[..., -1] * 20.0
    return g


def hopper_ptx(fn: Callable[..., Any], types: dict, consts: dict, warps: int, stages: int = 2) -> str:
    """The PTX Triton compiles for sm_90 from the plain kernel function ``fn`` (no GPU needed).

    ``types``: pointer arguments by name (e.g. ``"*bf16"``), every other runtime argument ``i32``;
    ``consts``: constexpr values by name (those ``fn`` does not take are ignored).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jf = triton.jit(fn)
    names = jf.arg_names
    consts = {k: v for k, v in consts.items() if k in names}
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in names}
    src = ASTSource(jf, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    options = {"num_warps": warps, "num_stages": stages}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def number_docs_corpus(root: str, n_docs: int, lengths: tuple, vocab: int, seed: int = 0) -> str:
    """A corpus of ``n_docs`` documents of random ids in ``[0, vocab)``, ``lengths = (lo, hi)``
    tokens each (inclusive), EOD appended, tokenized with the NullTokenizer under ``root``: its
    data prefix (``--data-path``, with ``--tokenizer-type NullTokenizer --vocab-size vocab``)."""
    import json
    import random

    from megatron_lasp.data.preprocess import PreprocessConfig, preprocess_data

    rng = random.Random(seed)
    path = os.path.join(root, "docs.jsonl")
    with open(path, "w") as f:
        for _ in range(n_docs):
            n = rng.randint(*lengths)
            f.write(json.dumps({"text": " ".join(str(rng.randrange(vocab)) for _ in range(n))}) + "\n")
    preprocess_data(PreprocessConfig(input=path, output_prefix=os.path.join(root, "corpus"),
                                     tokenizer={"tokenizer_type": "NullTokenizer", "vocab_size": vocab},
                                     append_eod=True, log_interval=0))
    return os.path.join(root, "corpus_text_document")

