"""What the GPU held at its peak, by allocation site, from a ``--record-memory-history`` snapshot.

torch's viewer (pytorch.org/memory_viz) draws the same trace interactively; this prints it as text
(and JSON), for runs on a machine without a browser. The trace is replayed: an allocation is live
from its ``alloc`` event to its ``free_completed`` event. Blocks still allocated when the snapshot
was written but allocated before the trace began (the weights and optimizer state of a run whose
recording started at its first step, or events older than the ``max_entries`` kept) are counted
as live throughout. Each block is named by the innermost stack frame in ``--site`` (default: this
package's files), else its innermost Python frame.

    python benchmarks/memory_peak.py snapshot.pickle --top 15 --json peak.json
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from collections import defaultdict
from typing import Any, Dict, List, Tuple


def _site(frames: List[Dict[str, Any]], marker: str) -> str:
    python = [f for f in frames if str(f.get("filename", "")).endswith(".py")]
    for f in python:
        if marker in str(f["filename"]):
            return f"{f['filename'].split(marker, 1)[-1].lstrip('/')}:{f['line']} {f['name']}"
    if python:
        f = python[0]
        return f"{f['filename']}:{f['line']} {f['name']}"
    return "(no Python frame)"


def peak(snapshot: Dict[str, Any], device: int = 0, marker: str = "megatron_lasp", top: int = 15) -> Dict[str, Any]:
    """The peak of the replayed trace of ``device``: its bytes, the event index where it was
    reached, the bytes allocated before the trace, and the ``top`` sites live at the peak."""
    traces = snapshot["device_traces"][device] if snapshot.get("device_traces") else []
    traced = {e["addr"] for e in traces if e["action"] == "alloc"}
    before: List[Tuple[int, str]] = []
    for seg in snapshot.get("segments", []):
        if seg.get("device", device) != device:
            continue
        addr = seg["address"]
        for block in seg["blocks"]:
            if block["state"] == "active_allocated" and addr not in traced:
                before.append((block["size"], _site(block.get("frames", []), marker)))
            addr += block["size"]
    base = sum(size for size, _ in before)
    live: Dict[int, Tuple[int, str]] = {}
    current = best = 0
    best_at, best_live = -1, {}
    for i, e in enumerate(traces):
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], _site(e.get("frames", []), marker))
            current += e["size"]
            if current > best:
                best, best_at, best_live = current, i, dict(live)
        elif e["action"] == "free_completed" and e["addr"] in live:
            current -= live.pop(e["addr"])[0]
    sites: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
    for size, site in list(best_live.values()) + before:
        sites[site][0] += size
        sites[site][1] += 1
    ranked = sorted(sites.items(), key=lambda kv: -kv[1][0])[:top]
    return {"peak_bytes": base + best, "traced_peak_bytes": best, "before_trace_bytes": base,
            "events": len(traces), "peak_event": best_at,
            "sites": [{"site": s, "bytes": b, "blocks": n} for s, (b, n) in ranked]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("snapshot", help="a pickle written by --record-memory-history")
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--site", default="megatron_lasp", help="name blocks by the innermost frame in files with this in their path")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    try:
        with open(args.snapshot, "rb") as f:
            snapshot = pickle.load(f)
        result = peak(snapshot, args.device, args.site, args.top)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError) as err:
        print(f"error: {args.snapshot}: not a readable memory snapshot ({type(err).__name__}: {err}); "
              "give the file --memory-snapshot-path wrote", file=sys.stderr)
        return 2
    gib = 2 ** 30
    print(f"peak {result['peak_bytes'] / gib:.2f} GiB = {result['traced_peak_bytes'] / gib:.2f} GiB allocated in the "
          f"trace (event {result['peak_event']} of {result['events']}) + {result['before_trace_bytes'] / gib:.2f} GiB "
          "allocated before it")
    for s in result["sites"]:
        print(f"{s['bytes'] / gib:9.3f} GiB {s['blocks']:6d} blocks  {s['site']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
