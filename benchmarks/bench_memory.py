"""Longest sequence that trains on this GPU, per setting; peak memory and tokens/s per length.

Each candidate length runs in its own subprocess (an out-of-memory error cannot poison the next)
through the project's training loop: ``megatron_lasp.training.loop.setup`` + ``train_step`` for
``--steps`` real optimizer steps on ``--mock-data`` (default 3; the first is the warm-up, tokens/s
is measured over the others), and counts as "trains" when every loss is finite. The search per
setting doubles from ``--start`` until a length fails, then bisects until the interval is below
``--resolution`` or the wall-clock budget (``--budget-s``, shared by the settings) would be
exceeded (a candidate is skipped when its time, extrapolated from the last one, does not fit).
``--lengths`` measures a fixed list instead.

Settings (``--settings``, comma separated; each adds flags to the common ones below):
    plain        --no-fused-linear-cross-entropy (megatron-core's output layer + loss)
    fused        the fused chunked loss (default of the training script)
    chunked      fused + --recompute-chunk-size 16384 (the whole layer in chunks on one GPU)
    offload      fused + --recompute-chunk-size 16384 + --cpu-offloading (+ --cpu-offloading-num-layers N
                 with ``--offload-layers N``: the first N layers' inputs only)
Common flags: --model-preset PRESET --mock-data --bf16 --ddp-impl megatron
--use-distributed-optimizer --micro-batch-size 1 --recompute-granularity full (one layer per unit);
``--extra "..."`` appends more to every setting. The memory model printed beside each measurement
reads ``--recompute-chunk-size`` and ``--cpu-offloading-num-layers`` from the candidate's flags.

Output (in ``--out``, written atomically): ``memory_<preset>.json`` (every candidate: length,
setting, ok / reason, peak allocated and reserved GiB, tokens/s, step times, losses, the memory
model's prediction and its error, a fit ``peak = fixed + per_token x length`` per setting) and
``memory_<preset>.png`` (peak memory vs length per setting, prediction dashed) when matplotlib is
installed.

Example (TNL-1B, one H200, about 8 minutes)::

    python benchmarks/bench_memory.py --preset tnl-1b --settings chunked --budget-s 470 --out docs/benchmarks

1M and 2M tokens with the first 8 layers' inputs in pinned host memory, then without offload
(2M does not fit without it), about 7 minutes::

    python benchmarks/bench_memory.py --preset tnl-1b --settings offload,chunked --offload-layers 8 \
        --lengths 1048576,2097152 --budget-s 560 --candidate-timeout 360 --out docs/benchmarks/memory_2m
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_lasp.atomic import write_text_atomic  # noqa: E402

SETTINGS = {
    "plain": ["--no-fused-linear-cross-entropy"],
    "fused": [],
    "chunked": ["--recompute-chunk-size", "16384"],
    "offload": ["--recompute-chunk-size", "16384", "--cpu-offloading"],
}
GIB = 2**30


def common_flags(preset: str, seq: int, steps: int) -> List[str]:
    return [
        "--model-preset", preset, "--mock-data", "--bf16", "--ddp-impl", "megatron",
        "--use-distributed-optimizer", "--micro-batch-size", "1", "--global-batch-size", "1",
        "--train-iters", str(steps), "--seq-length", str(seq), "--recompute-granularity", "full",
        "--recompute-method", "uniform", "--recompute-num-layers", "1", "--log-interval", str(steps),
        "--eval-interval", "0", "--lr", "1e-4",
    ]


# ----------------------------------------------------------------------------------------------
# memory model (docs/MEMORY.md)


def memory_model(preset: str, seq: int, setting: str, tp: int = 1, sp: int = 1,
                 chunk_size: int = 16384, mode: str = "lasp",
                 offload_layers: Optional[int] = None) -> Dict[str, float]:
    """Predicted peak bytes of one rank (bf16, megatron DDP + distributed optimizer over sp ranks,
    micro-batch 1, full recompute): a dict of GPU components and ``total``, and ``host pinned``
    (the offloaded layer inputs). See docs/MEMORY.md.

    Args:
        setting: one of :data:`SETTINGS`.
        offload_layers: with ``offload``, the layers whose inputs move (``--cpu-offloading-num-layers``,
            the first of the stage); None: all.
    """
    from megatron_lasp.models.config import PRESETS, LinearLMConfig
    from megatron_lasp.models.loss import default_chunk_size

    p = PRESETS[preset]
    f = p.fields
    L, h, ffn, V = f["num_layers"], f["hidden_size"], f["ffn_hidden_size"], p.vocab_size
    V = int(math.ceil(V / (128 * tp)) * 128 * tp)
    # a hybrid's softmax layers: q and G key/value heads, no gate or output norm
    S = (f.get("hybrid_layer_pattern") or "").count("*")
    H = f["num_attention_heads"]
    Gd = (f.get("num_query_groups") or H) * (h // H)  # key/value width
    params = (2 * V * h + (L - S) * (4 * h * h + h * h + 3 * h * ffn + 3 * h)
              + S * (h * (h + 2 * Gd) + h * h + 3 * h * ffn + 2 * h) + h)
    a = 2  # bf16
    T = seq / sp  # tokens of this rank
    tok = T / tp  # tokens of this rank's activations with TP sequence parallelism (tp=1: T)
    out = {}
    out["weights+grads+optimizer"] = params / tp * (a + 4) + params / tp * 12 / sp
    chunked = setting in ("chunked", "offload")
    moved = (L if offload_layers is None else offload_layers) if setting == "offload" else 0
    if setting == "offload" and not 1 <= moved <= L:
        raise ValueError(f"--cpu-offloading-num-layers must be between 1 and {L}, got {offload_layers}")
    # the kept inputs (the last L - moved layers), and from the first kept layer's backward on, the
    # moved ones two at a time (the one in use and the one coming back)
    out["saved layer inputs"] = (max(L - moved, 2) if moved else L) * h * a * tok
    # the final norm's input (saved until its backward, right after the loss's); with every layer
    # offloaded it goes to the host and is the first to come back, at the end of the forward
    out["final norm input"] = h * a * tok
    host = (moved + (moved == L)) * h * a * tok
    attn_saved = 14 * h * a  # x, norm, q k v u, phi(q k v), o, norm(o), sigmoid(u), gated, mid
    attn_grads = 8 * h * a  # gradients in the attention backward (d mixed, d q k v)
    mlp_saved = (3 * ffn + 2 * h) * a
    mlp_grads = 3 * ffn * a
    whole = max(attn_saved + mlp_saved + mlp_grads, attn_saved + attn_grads)  # one layer, per token
    if chunked and tp == 1 and (sp == 1 or mode == "lasp"):
        # the whole layer in chunks: one chunk's working set + the gradients of the layer's
        # output and input over the whole sequence
        out["layer recompute working set"] = whole * min(chunk_size, tok) + 2 * h * a * tok
    elif chunked:
        # TP sequence parallelism or an SP mode other than lasp: the attention half over the
        # slice, the MLP half in chunks
        out["layer recompute working set"] = (attn_saved + attn_grads + 2 * h * a) * tok
    else:
        out["layer recompute working set"] = (whole + 2 * h * a) * tok
    if setting == "plain":
        # bf16 logits + their fp32 copy (megatron's loss works in place on it) + hidden states
        out["output layer + loss"] = (a + 4) * V / tp * T + 2 * h * a * T
    else:
        chunk = default_chunk_size(V // tp)
        out["output layer + loss"] = (V / tp * h * 4 * 2 + min(chunk, T) * V / tp * (4 + a)
                                      + 2 * h * a * T)
    if S:
        # a softmax layer's working set: x, norm, qkv, roped q k, o, mid (the flash kernel keeps
        # no [T, T] matrix) and their gradients. Chunked without TP sequence parallelism (one rank,
        # or the all-gather softmax mode over P > 1) from softmax_query_chunks_from tokens: in query chunks, one chunk's working set plus
        # the layer's output and input gradients over the slice, and over the keys it reads (the
        # last rank: the whole sequence) the keys and values (one rank: concatenated for a chunk),
        # their gradient and the fp32 sums of those gradients. On one rank every softmax layer keeps
        # its keys and values from its forward to its backward; over P > 1 the backward gathers them
        # again, and keeps the queries' and the residual's gradients of the slice between its passes.
        # Chunked otherwise: the attention half over the whole slice, the MLP half in chunks.
        # Unchunked with the all-gather over P > 1 ranks, the gathered K and V of the group's
        # tokens, their gradients and the reduce-scatter's send buffer
        soft_saved = (6 * h + 3 * Gd) * a
        soft_grads = (4 * h + 4 * Gd) * a
        soft_whole = max(soft_saved + mlp_saved + mlp_grads, soft_saved + soft_grads)
        query_chunks = chunked and tp == 1 and seq >= LinearLMConfig.softmax_query_chunks_from
        if query_chunks:
            soft = soft_whole * min(chunk_size, tok) + 2 * h * a * tok + (4 * Gd * a + 2 * Gd * 4) * seq
            if sp == 1:
                out["softmax layers' keys and values"] = S * 2 * Gd * a * tok
            else:  # the backward keeps each chunk's query and residual gradients between its passes
                soft += 2 * h * a * tok
        elif chunked:
            soft = (soft_saved + soft_grads + 2 * h * a) * tok
        else:
            soft = (soft_whole + 2 * h * a) * tok
        if sp > 1 and not query_chunks:
            soft += 6 * Gd / tp * a * seq
        out["softmax layer working set"] = soft
    # the loss phase and the layer phase do not overlap: the peak is the larger one
    loss_phase = out["output layer + loss"] + out["final norm input"]
    layer_phase = max(out["layer recompute working set"], out.get("softmax layer working set", 0.0))
    out["total"] = (out["weights+grads+optimizer"] + out["saved layer inputs"] + max(loss_phase, layer_phase)
                    + out.get("softmax layers' keys and values", 0.0))
    out["host pinned"] = host
    out["params"] = params
    return out


def setting_flags(setting: str, extra: str, offload_layers: Optional[int] = None) -> List[str]:
    """The training flags of ``setting`` beyond :func:`common_flags`: its own, then
    ``--cpu-offloading-num-layers offload_layers`` (``offload`` only), then ``extra``."""
    flags = list(SETTINGS[setting])
    if setting == "offload" and offload_layers is not None:
        flags += ["--cpu-offloading-num-layers", str(offload_layers)]
    return flags + extra.split()


def model_options(flags_text: str) -> Dict[str, int]:
    """The :func:`memory_model` arguments that a candidate's training flags (space-separated)
    change: the chunk of ``--recompute-chunk-size`` and the layers of
    ``--cpu-offloading-num-layers`` (the last given, as argparse reads them)."""
    flags = {"--recompute-chunk-size": "chunk_size", "--cpu-offloading-num-layers": "offload_layers"}
    tokens, options = flags_text.split(), {}
    for i, token in enumerate(tokens):
        name, _, value = token.partition("=")
        if name in flags:
            value = value or (tokens[i + 1] if i + 1 < len(tokens) else "")
            try:
                options[flags[name]] = int(value)
            except ValueError:
                raise ValueError(f"{name} needs an integer, got {value!r}") from None
    return options


# ----------------------------------------------------------------------------------------------
# one candidate (child process)


def _child(args) -> int:
    import torch

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    result = {"seq": args.seq, "setting": args.setting, "ok": False}
    try:
        from megatron_lasp.training import loop

        argv = common_flags(args.preset, args.seq, args.steps) + setting_flags(args.setting, args.extra,
                                                                               args.offload_layers)
        state = loop.setup(argv)
        torch.cuda.synchronize()
        result["after_setup_gib"] = torch.cuda.memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            loss, _ = loop.train_step(state)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(loss)
        timed = times[1:] or times
        result.update(
            ok=all(math.isfinite(x) for x in losses),
            losses=losses,
            step_s=times,
            tokens_per_s=args.seq * len(timed) / sum(timed),
            peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
            peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
        )
        if not result["ok"]:
            result["reason"] = "non-finite loss"
    except torch.OutOfMemoryError as err:
        result["reason"] = "out of memory: " + str(err).splitlines()[0][:200]
    except BaseException as err:  # report, do not hide
        result["reason"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
    try:
        with open(f"/proc/{os.getpid()}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    result["host_peak_rss_gib"] = int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    write_text_atomic(args.result, json.dumps(result))
    return 0 if result["ok"] else 1


# ----------------------------------------------------------------------------------------------
# the search (parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_candidate(args, setting: str, seq: int, timeout: float) -> dict:
    result_path = os.path.join(args.out, f".candidate_{setting}_{seq}.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    env = dict(os.environ, MASTER_PORT=str(_free_port()), PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if not args.no_expandable_segments:
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--preset", args.preset, "--setting", setting,
           "--seq", str(seq), "--steps", str(args.steps), "--result", result_path, "--extra", args.extra]
    if args.offload_layers is not None:
        cmd += ["--offload-layers", str(args.offload_layers)]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        tail = proc.stdout[-1500:]
    except subprocess.TimeoutExpired as err:
        tail = (err.stdout or b"")[-1500:] if isinstance(err.stdout, bytes) else (err.stdout or "")[-1500:]
        result = {"seq": seq, "setting": setting, "ok": False, "reason": f"timeout after {timeout:.0f} s"}
        result["wall_s"] = time.time() - t0
        return result
    try:
        with open(result_path) as fh:
            result = json.load(fh)
        os.remove(result_path)
    except (OSError, ValueError):
        result = {"seq": seq, "setting": setting, "ok": False, "reason": "child died", "log_tail": tail}
    result["wall_s"] = time.time() - t0
    pred = memory_model(args.preset, seq, setting, **model_options(" ".join(setting_flags(setting, args.extra,
                                                                                        args.offload_layers))))
    result["predicted_gib"] = pred["total"] / GIB
    result["predicted_host_pinned_gib"] = pred["host pinned"] / GIB
    if result.get("peak_allocated_gib"):
        result["prediction_error"] = result["predicted_gib"] / result["peak_allocated_gib"] - 1.0
    if not result["ok"]:
        result["log_tail"] = tail
    status = "ok" if result["ok"] else result.get("reason", "failed")
    host = (f"; host RSS peak {result.get('host_peak_rss_gib', float('nan')):.1f} GiB "
            f"(model: {result['predicted_host_pinned_gib']:.1f} pinned)" if setting == "offload" else "")
    print(f"[bench_memory] {setting:8s} seq {seq:>9d}: {status}; peak {result.get('peak_allocated_gib', float('nan')):.1f} GiB "
          f"(model {result['predicted_gib']:.1f}){host}; {result.get('tokens_per_s', float('nan')):.0f} tokens/s; "
          f"{result['wall_s']:.0f} s", flush=True)
    return result


def _search(args, setting: str, deadline: float, records: list) -> dict:
    lo, hi = None, None
    seq = args.start
    walls = []  # (seq, wall seconds) of the candidates run so far

    def fits(candidate):
        remaining = deadline - time.time()
        if not walls:
            return remaining > 30
        if len(walls) >= 2:  # wall = start-up + per-token time, from the last two
            (s0, w0), (s1, w1) = walls[-2], walls[-1]
            slope = max((w1 - w0) / (s1 - s0), 0.0) if s1 != s0 else 0.0
            estimate = w1 + slope * (candidate - s1)
        else:
            estimate = walls[-1][1] * max(1.0, candidate / walls[-1][0])
        return estimate < remaining

    while True:
        if lo is not None and hi is not None:
            if hi - lo <= args.resolution:
                break
            seq = (lo + hi) // 2 // args.resolution * args.resolution
            if seq <= lo:
                break
        if seq > args.max_seq or not fits(seq):
            break
        timeout = min(args.candidate_timeout, max(30.0, deadline - time.time()))
        r = _run_candidate(args, setting, seq, timeout)
        records.append(r)
        walls.append((seq, r["wall_s"]))
        if r["ok"]:
            lo = seq
            if hi is None:
                seq *= 2
        else:
            hi = seq
            if lo is None:
                break
    return {"setting": setting, "longest_ok": lo, "shortest_failed": hi}


def _fit(records: list) -> Dict[str, dict]:
    fits = {}
    for setting in dict.fromkeys(r["setting"] for r in records):
        pts = [(r["seq"], r["peak_allocated_gib"]) for r in records if r["setting"] == setting and r.get("ok")]
        if len(pts) >= 2:
            n = len(pts)
            mx = sum(p[0] for p in pts) / n
            my = sum(p[1] for p in pts) / n
            sxx = sum((p[0] - mx) ** 2 for p in pts)
            slope = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else float("nan")
            fits[setting] = {"fixed_gib": my - slope * mx, "per_token_kib": slope * GIB / 1024, "points": n}
    return fits


def _plot(doc: dict, path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, setting in enumerate(dict.fromkeys(r["setting"] for r in doc["candidates"])):
        rs = sorted((r for r in doc["candidates"] if r["setting"] == setting), key=lambda r: r["seq"])
        ok = [r for r in rs if r.get("ok")]
        color = f"C{i}"
        ax.plot([r["seq"] / 1024 for r in ok], [r["peak_allocated_gib"] for r in ok], "o-", color=color,
                label=f"{setting} (measured)")
        modelled = [r for r in rs if "predicted_gib" in r]  # a timed-out candidate may have none
        ax.plot([r["seq"] / 1024 for r in modelled], [r["predicted_gib"] for r in modelled], "--", color=color,
                alpha=0.6, label=f"{setting} (model)")
        bad = [r for r in rs if not r.get("ok")]
        ax.plot([r["seq"] / 1024 for r in bad], [doc["gpu_total_gib"] or 0] * len(bad), "x", color=color)
    if doc.get("gpu_total_gib"):
        ax.axhline(doc["gpu_total_gib"], color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per step (K), one GPU")
    ax.set_ylabel("peak allocated GiB")
    ax.set_title(f"{doc['preset']}: peak memory vs sequence length (x: failed)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="output directory (JSON + PNG)")
    p.add_argument("--preset", default="tnl-1b")
    p.add_argument("--settings", default="offload", help=f"comma-separated, of {', '.join(SETTINGS)}")
    p.add_argument("--start", type=int, default=262144, help="first length of the doubling search")
    p.add_argument("--max-seq", type=int, default=16 * 2**20)
    p.add_argument("--resolution", type=int, default=262144, help="stop bisecting below this interval")
    p.add_argument("--lengths", default=None, help="comma-separated lengths to measure instead of searching")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per candidate (>= 3)")
    p.add_argument("--budget-s", type=float, default=470.0, help="wall-clock budget of the whole run")
    p.add_argument("--candidate-timeout", type=float, default=300.0)
    p.add_argument("--extra", default="", help="more training flags for every candidate")
    p.add_argument("--offload-layers", type=int, default=None,
                   help="--cpu-offloading-num-layers for the offload setting only (default: every layer)")
    p.add_argument("--no-expandable-segments", action="store_true",
                   help="do not set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in the candidates")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--setting", help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)
    if not args.out:
        p.error("--out DIR is required")
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        p.error(f"--settings: unknown {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    if args.steps < 3:
        p.error("--steps must be >= 3 (the first step is the warm-up)")
    try:  # the model's reading of --extra, before any candidate runs
        for setting in settings:
            memory_model(args.preset, args.start, setting,
                         **model_options(" ".join(setting_flags(setting, args.extra, args.offload_layers))))
    except (KeyError, ValueError) as err:
        p.error(f"--preset {args.preset} / --offload-layers / --extra {args.extra!r}: {err}")
    os.makedirs(args.out, exist_ok=True)
    try:
        import torch

        gpu_total = torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else None
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:
        gpu_total, device = None, "unknown"
    if gpu_total is None:
        p.error("needs a CUDA GPU (the training flags use --bf16 --ddp-impl megatron)")
    t_start = time.time()
    deadline = t_start + args.budget_s
    records, summary = [], []
    if args.lengths:
        lengths = [int(x) for x in args.lengths.split(",")]
        for setting in settings:
            for seq in lengths:
                remaining = deadline - time.time()
                if remaining < 30:
                    break
                records.append(_run_candidate(args, setting, seq, min(args.candidate_timeout, remaining)))
    else:
        for i, setting in enumerate(settings):
            # share what is left equally among the settings still to run
            share = (deadline - time.time()) / (len(settings) - i)
            summary.append(_search(args, setting, time.time() + share, records))
    doc = {
        "preset": args.preset,
        "device": device,
        "gpu_total_gib": gpu_total,
        "command": " ".join([os.path.relpath(__file__, REPO)] + (argv if argv is not None else sys.argv[1:])),
        "common_flags": common_flags(args.preset, 0, args.steps),
        "settings": {s: setting_flags(s, args.extra, args.offload_layers) for s in settings},
        "search": summary,
        "fit": _fit(records),
        "wall_s": time.time() - t_start,
        "candidates": records,
    }
    path = os.path.join(args.out, f"memory_{args.preset}.json")
    write_text_atomic(path, json.dumps(doc, indent=1))
    png = _plot(doc, os.path.join(args.out, f"memory_{args.preset}.png"))
    print(f"[bench_memory] wrote {path}" + (f" and {png}" if png else " (no matplotlib: no PNG)"))
    for s in summary:
        print(f"[bench_memory] {s['setting']}: longest that trains {s['longest_ok']}, shortest failed {s['shortest_failed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
