"""Whether a finished ``main()`` leaves its model, optimizer or GPU memory alive in the process
(tests run several trainings in one process): trains the default path (bf16, megatron DDP +
distributed optimizer) a few times, dropping each returned state, and after each run prints the
memory still allocated before and after a garbage collection (what only the collection frees was
cyclic garbage) and, for whatever is still alive after it, the chain of referrers that holds it.

    python benchmarks/gpu_check_leak.py --runs 3 --out leak.json
"""

from __future__ import annotations

import argparse
import gc
import json
import types
import weakref

import torch

BASE = [
    "--model-preset", "tnl-1b", "--num-layers", "2", "--mock-data", "--seq-length", "4096",
    "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "3", "--seed", "7",
    "--lr", "3e-4", "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-interval", "0",
    "--ddp-impl", "megatron", "--bf16", "--use-distributed-optimizer",
]


def _describe(obj) -> str:
    if isinstance(obj, dict) and "__name__" in obj and "__loader__" in obj:
        return f"module dict {obj['__name__']}"
    if isinstance(obj, dict):
        return f"dict({len(obj)} keys: {list(obj)[:6]})"
    if isinstance(obj, (list, tuple)):
        return f"{type(obj).__name__}(len {len(obj)})"
    if isinstance(obj, types.FunctionType):
        return f"function {obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, types.MethodType):
        return f"method {obj.__func__.__qualname__}"
    if isinstance(obj, types.CellType):
        return "cell"
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def referrer_chains(target, depth: int = 8, width: int = 3, skip=()) -> list:
    """Chains of referrers from ``target`` outwards, breadth-first, up to a module, a class or an
    object nothing refers to (frames and this search's own lists skipped)."""
    ignore = {id(s) for s in skip}
    done, frontier = [], [[target]]
    ignore.update((id(done), id(frontier), id(frontier[0])))
    for _ in range(depth):
        nxt = []
        ignore.add(id(nxt))
        for chain in frontier:
            last = chain[-1]
            refs = [] if isinstance(last, (types.ModuleType, type)) else [
                r for r in gc.get_referrers(last)
                if id(r) not in ignore and not isinstance(r, types.FrameType) and not any(r is c for c in chain)]
            if not refs:
                done.append(chain)
                continue
            for r in refs[:width]:
                longer = chain + [r]
                ignore.add(id(longer))
                nxt.append(longer)
        frontier = nxt[: width * 4]
        ignore.add(id(frontier))
        if not frontier:
            break
    return [[_describe(o) for o in c] for c in done + frontier]


def live_cuda_bytes() -> int:
    total, seen = 0, set()
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and o.is_cuda:
                st = o.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    total += st.nbytes()
        except Exception:  # noqa: BLE001 - some objects refuse inspection
            pass
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default=None)
    opts = p.parse_args()
    from megatron_lasp.training import main as train_main

    results = []
    for i in range(opts.runs):
        state = train_main(BASE)
        refs = {"model": weakref.ref(state.model), "optimizer": weakref.ref(state.optimizer),
                "param": weakref.ref(next(state.model.parameters()))}
        del state
        torch.cuda.synchronize()
        row = {"run": i, "allocated_gib_before_gc": torch.cuda.memory_allocated() / 2**30,
               "alive_before_gc": {k: r() is not None for k, r in refs.items()}}
        gc.collect()  # what survives this is held, not cyclic garbage
        alive = {k: r() is not None for k, r in refs.items()}
        row.update(allocated_gib=torch.cuda.memory_allocated() / 2**30,
                   live_cuda_tensor_gib=live_cuda_bytes() / 2**30, alive=alive)
        for k, r in refs.items():
            obj = r()
            if obj is not None:
                row[f"chains_{k}"] = referrer_chains(obj, skip=(refs,))
            del obj
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("chains")}), flush=True)
        for k in row:
            if k.startswith("chains"):
                print(k)
                for c in row[k][:12]:
                    print("   ", " <- ".join(c))
        results.append(row)
    if opts.out:
        with open(opts.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
