"""Where the gated backward's time and its bf16 dg error come from (diagnostic, one H100)."""
import json, sys, time
import torch
sys.path.insert(0, "benchmarks")
from bench_kernels import make_inputs, make_gates
from megatron_lasp.ops.lightning_attn import chunk_lightning_attn
from megatron_lasp.ops.lightning_attn.gate import gate_grad, reverse_cumsum_docs
out = {}

def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

def grads(fn, leaves_in, do, dht):
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves_in]
    o, ht = fn(*leaves)
    torch.autograd.backward((o, ht) if dht is not None else (o,), (do.to(o.dtype), dht.to(ht.dtype)) if dht is not None else (do.to(o.dtype),))
    return [o.detach(), ht.detach() if ht is not None else None] + [x.grad for x in leaves]

torch.manual_seed(0)
q, k, v, h0, slopes, do, dht = make_inputs(1, 8192, 16, 128)
g = make_gates(1, 8192, 16)
from fla.ops.simple_gla import chunk_simple_gla
import fla.ops.common.chunk_o as fla_chunk_o
fla_chunk_o.TRITON_ABOVE_3_7_1 = True
for label, use_h in (("with_h0_dht", True), ("no_h0_dht", False)):
    res = {}
    H0 = h0 if use_h else None
    DHT = dht if use_h else None
    def ours(q_, k_, v_, g_, h_=None, backend="triton"):
        return chunk_lightning_attn(q_, k_, v_, None, h_, use_h, backend=backend, g=g_)
    def fl(q_, k_, v_, g_, h_=None):
        return chunk_simple_gla(q_, k_, v_, g=g_, scale=1.0, initial_state=h_, output_final_state=use_h)
    ins = [q, k, v, g] + ([h0] if use_h else [])
    ref = grads(lambda *a: ours(*a, backend="torch"), [x.double() for x in ins], do, DHT.double() if use_h else None)
    mine = grads(ours, ins, do, DHT)
    theirs = grads(fl, ins, do, DHT)
    names = ["o", "ht", "dq", "dk", "dv", "dg"]
    res["ours"] = {n: rel(a, b) for n, a, b in zip(names, mine, ref) if a is not None}
    res["fla"] = {n: rel(a, b) for n, a, b in zip(names, theirs, ref) if a is not None}
    fs = mine[1] if use_h else None
    # dg assembled in fp64 from each side's dq, dk
    res["dg_fp64_from_our_dqdk"] = rel(gate_grad(q.double(), mine[2].double(), k.double(), mine[3].double(), None,
                                                 fs.double() if use_h else None, DHT.double() if use_h else None), ref[5])
    res["dg_fp64_from_fla_dqdk"] = rel(gate_grad(q.double(), theirs[2].double(), k.double(), theirs[3].double(), None,
                                                 theirs[1].double() if use_h else None, DHT.double() if use_h else None), ref[5])
    res["dg_fp64_from_ref_dqdk_bf16"] = rel(gate_grad(q.double(), ref[2].bfloat16().double(), k.double(), ref[3].bfloat16().double(), None,
                                                 ref[1] if use_h else None, DHT.double() if use_h else None), ref[5])
    res["dg_fp64_from_ref_dqdk_fp32"] = rel(gate_grad(q.double(), ref[2].float().double(), k.double(), ref[3].float().double(), None,
                                                 ref[1] if use_h else None, DHT.double() if use_h else None), ref[5])
    res["dq_rel_ours_vs_fla"] = rel(mine[2], theirs[2])
    out[label] = res
    print(label, json.dumps(res), flush=True)

# time of the old single-level reverse cumsum vs the new one at 128K
x = torch.randn(1, 131072, 16, device="cuda")
def old(x):
    return x.double().flip(1).cumsum(1).flip(1).float()
for name, fn in (("old_cumsum_T", old), ("new_two_level", lambda x: reverse_cumsum_docs(x, None))):
    fn(x); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(5): fn(x)
    torch.cuda.synchronize(); out[name + "_ms"] = (time.perf_counter() - t) / 5 * 1e3
print("cumsum", out["old_cumsum_T_ms"], out["new_two_level_ms"], flush=True)

# profile fwd+bwd gated and fixed at 128K
from torch.profiler import profile, ProfilerActivity
q, k, v, h0, slopes, do, dht = make_inputs(1, 131072, 16, 128)
g = make_gates(1, 131072, 16).requires_grad_(True)
for name, fn in (("gated", lambda a, b, c, h: chunk_lightning_attn(a, b, c, None, h, True, backend="triton", g=g)),
                 ("fixed", lambda a, b, c, h: chunk_lightning_attn(a, b, c, slopes, h, True, backend="triton"))):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, h0)]
    def step():
        o, ht = fn(*leaves)
        torch.autograd.backward((o, ht), (do, dht))
    for _ in range(3): step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(); torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14)
    print(name, "\n", table, flush=True)
    out["profile_" + name] = table
json.dump(out, open(sys.argv[1], "w"), indent=1)
