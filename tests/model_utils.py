"""Helpers for comparing a sharded (TP / SP / DP / PP) model with its single-process reference.

Conventions (megatron-core's, set on every parameter it builds):
- ``param.tensor_model_parallel`` / ``partition_dim`` / ``partition_stride``: a TP shard. With
  ``use_cpu_initialization=True`` every shard is a slice of one master weight: stride 1 is a
  contiguous slice, stride ``k`` interleaves ``k`` pieces per rank (the GLU ``linear_fc1``:
  rank r holds ``[W1_r; W2_r]``).
- ``param.sequence_parallel``: replicated over TP, but with TP sequence parallelism each TP rank
  sees a slice of the tokens, so its gradient is partial and must be summed over TP.
- SP (and DP) ranks see different tokens: parameter gradients are summed over ``dp_cp``.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist

from megatron_lasp.parallel import split_sequence


def gather_tp(t: torch.Tensor, param: torch.nn.Parameter, tp_group: dist.ProcessGroup) -> torch.Tensor:
    """The full tensor of a TP shard ``t`` of ``param`` (unchanged if ``param`` is not TP-sharded)."""
    if not getattr(param, "tensor_model_parallel", False) or tp_group.size() == 1:
        return t
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    parts = [torch.empty_like(t) for _ in range(tp_group.size())]
    dist.all_gather(parts, t.contiguous(), group=tp_group)
    if stride == 1:
        return torch.cat(parts, dim=dim)
    pieces = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(len(parts))], dim=dim)


def full_grads(model: torch.nn.Module, groups) -> Dict[str, torch.Tensor]:
    """Every parameter's full gradient, keyed by parameter name (identical on the ranks of a stage).

    Sums over ``dp_cp`` (different tokens), over TP for ``sequence_parallel`` params when TP
    sequence parallelism is on (the attribute is set only then), then gathers TP shards. With
    pipeline parallelism each stage gets its own parameters (stage-local layer names: map them
    with megatron-core's ``get_transformer_layer_offset``).
    """
    out: Dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        g = p.grad.detach().clone()
        dist.all_reduce(g, group=groups.dp_cp)
        if getattr(p, "sequence_parallel", False) and groups.tp.size() > 1:
            dist.all_reduce(g, group=groups.tp)
        out[name] = gather_tp(g, p, groups.tp)
    return out


def full_params(model: torch.nn.Module, groups) -> Dict[str, torch.Tensor]:
    """Every parameter's full value (TP shards gathered), keyed by name."""
    return {name: gather_tp(p.detach(), p, groups.tp) for name, p in model.named_parameters()}


def sharded_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    groups,
    decoder_input: Optional[torch.Tensor] = None,
    **model_kwargs,
) -> torch.Tensor:
    """Forward + backward of this rank's slice; returns the global mean loss (on every rank).
    ``model_kwargs`` go to the model (e.g. ``packed_seq_params``).

    ``input_ids`` / ``labels``: the FULL ``[b, T]`` batch, the same on every rank (data replicated
    over DP, so the DP mean equals the single-process loss). Each rank runs its contiguous SP
    slice; its loss is ``sum(token losses) / (b * T * dp)`` so that the sum over ``dp_cp`` is the
    mean over all tokens.
    """
    ids = split_sequence(input_ids, groups.cp, dim=1)
    lab = split_sequence(labels, groups.cp, dim=1)
    per_token = model(ids, labels=lab, **model_kwargs)
    assert per_token.shape == lab.shape, f"loss shape {tuple(per_token.shape)} != labels {tuple(lab.shape)}"
    local = per_token.float().sum() / (labels.numel() * groups.dp.size())
    local.backward()
    total = local.detach().clone()
    dist.all_reduce(total, group=groups.dp_cp)
    return total


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in fp64 (0 when both are 0)."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


def compare_grads(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], name_map=None) -> Dict[str, float]:
    """Relative error of each gradient against the reference (after an optional name mapping)."""
    errs = {}
    for name, g in got.items():
        ref_name = name_map(name) if name_map else name
        r = ref[ref_name]
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} vs reference {tuple(r.shape)}"
        errs[name] = rel_err(g, r)
    return errs


def train_losses(rank, world_size, base, configs):
    """``main(base + extra)`` of the training entry point for each extra flag list (a ``spawn``
    target): the per-iteration losses, or the startup error's text."""
    from megatron_lasp.training import main
    from megatron_lasp.training.loop import StartupError

    out = []
    for extra in configs:
        try:
            out.append(list(main(list(base) + list(extra), destroy=False).losses))
        except StartupError as err:
            out.append(err.message)
    return out


def sharded_against_one_rank(world_size, layouts, make_config, vocab, seed, ids, labels, meta_prefix,
                             **forward_kwargs):
    """Each layout's sharded run against the one-rank run of the same seeded model (a ``spawn``
    target's body; every rank calls it): ``{layout id: record}``.

    Args:
        layouts: ``(id, tp, sp, sp_mode, tp_sequence_parallel, config overrides)`` each.
        make_config: ``**fields -> LinearLMConfig``; the reference is ``make_config()``.
        meta_prefix: the ``sharded_state_dict`` keys whose global shape and offset are recorded
            (``meta``: key after the prefix -> ``(shape, offset)``).
        forward_kwargs: passed to the model's forward (e.g. ``packed_seq_params``).

    Returns:
        per layout ``init_err`` (parameters against the one-rank init), ``loss_err``, ``grad_err``
        (the worst parameter's, named ``worst``), ``grad_errs`` (all), ``meta``, ``tp_rank``; or
        ``{"error": traceback}``.
    """
    import traceback

    from megatron_lasp.models import build_linear_lm
    from megatron_lasp.parallel import initialize_parallel

    torch.set_num_threads(1)
    initialize_parallel(1, 1, 1, seed=seed)
    torch.manual_seed(seed)
    ref_model = build_linear_lm(make_config(), vocab)
    ref_loss = ref_model(ids, labels=labels, **forward_kwargs).float().mean()
    ref_loss.backward()
    ref_params = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
    ref_grads = {n: p.grad.detach().clone() for n, p in ref_model.named_parameters()}
    results = {}
    for lid, tp, sp, mode, tpsp, extra in layouts:
        try:
            groups = initialize_parallel(tp, sp, 1, seed=seed)
            if groups.tp.size() * groups.cp.size() * groups.dp.size() != world_size:
                raise AssertionError("layout does not fill the world")
            torch.manual_seed(seed)
            model = build_linear_lm(make_config(tensor_model_parallel_size=tp, context_parallel_size=sp,
                                                sequence_parallel=tpsp, sequence_parallel_mode=mode, **extra), vocab)
            got = full_params(model, groups)
            init_err = max(rel_err(got[n], ref_params[n]) for n in got)
            loss = sharded_loss(model, ids, labels, groups, **forward_kwargs)
            errs = compare_grads(full_grads(model, groups), ref_grads)
            worst = max(errs, key=errs.get)
            meta = {k[len(meta_prefix):]: (tuple(sh.global_shape), tuple(sh.global_offset))
                    for k, sh in model.sharded_state_dict().items()
                    if k.startswith(meta_prefix) and not k.endswith("_extra_state")}
            results[lid] = dict(init_err=init_err, loss_err=rel_err(loss, ref_loss), grad_err=errs[worst],
                                worst=worst, grad_errs=errs, meta=meta, tp_rank=groups.tp.rank())
        except Exception:
            results[lid] = {"error": traceback.format_exc()}
        dist.barrier()
    return results
