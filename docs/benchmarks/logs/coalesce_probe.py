"""Which gloo collectives on CUDA tensors survive (one rank, one op per process)."""
import os, sys, subprocess
OPS = ["reduce_scatter", "all_gather", "all_reduce", "rs_coalesced", "ag_coalesced", "ar_coalesced"]
if len(sys.argv) == 1:
    for op in OPS:
        r = subprocess.run([sys.executable, __file__, op], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONFAULTHANDLER="1"))
        tail = (r.stdout + r.stderr).strip().splitlines()[-6:]
        print(f"{op}: rc={r.returncode} :: " + " | ".join(tail), flush=True)
    sys.exit(0)
import torch, torch.distributed as dist
from torch.distributed import _coalescing_manager
op = sys.argv[1]
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29655", rank=0, world_size=1)
x = torch.arange(8, dtype=torch.float32, device="cuda")
out = torch.empty(8, device="cuda")
if op == "reduce_scatter": dist.reduce_scatter_tensor(out, x)
elif op == "all_gather": dist.all_gather_into_tensor(out, x)
elif op == "all_reduce": dist.all_reduce(x)
else:
    with _coalescing_manager(None, async_ops=False) as cm:
        if op == "rs_coalesced": dist.reduce_scatter_tensor(out, x)
        elif op == "ag_coalesced": dist.all_gather_into_tensor(out, x)
        else: dist.all_reduce(x)
torch.cuda.synchronize()
print("ok", out.tolist() if op != "all_reduce" and op != "ar_coalesced" else x.tolist())
