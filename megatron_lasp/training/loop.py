"""The training loop: one code path for every parallel layout.

``main(argv)`` sets the run up (``startup.setup``: the flags into the run config, the process
groups, the model stage of this rank, the optimizer, the data, a checkpoint) and runs
:func:`train`. Every step goes through megatron-core's pipeline
schedule (``get_forward_backward_func``: ``forward_backward_no_pipelining`` at PP=1, 1F1B
otherwise), so TP, SP, PP and DP all share it.

Loss and gradients. The logged ``lm loss`` is the mean over all loss tokens of the global batch
(``loss_mask`` respected). Each micro-batch's backward loss on a rank is
``sum(loss_mask * token_loss over its slice) * f / N`` with ``N`` the loss tokens of the global
batch and ``f`` undoing the data-parallel wrapper's averaging (``f`` = the dp_cp size for torch
DDP / FSDP, which average; 1 for megatron DDP run with ``calculate_per_token_loss``, which sums),
so after the reduction over the data x sequence-parallel group every rank holds the gradient of
the global token mean, whatever the DP, SP and accumulation split.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import sys
import time
from functools import partial
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from megatron_lasp import platform
from megatron_lasp.training import arguments as arguments_mod
from megatron_lasp.training import data as data_mod
from megatron_lasp.training import checkpointing, logging_utils
from megatron_lasp.training.interrupts import PROG, LauncherWatchdog, StopRequests, record_clean_error
from megatron_lasp.training.cuda_graph import GraphCaptureError
from megatron_lasp.training.optim import fsdp_reshard, unwrap_model
from megatron_lasp.training.startup import (  # noqa: F401 - setup, model_config_from_run: re-exported for callers
    StartupError,
    TrainState,
    model_config_from_run,
    setup,
)

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss or gradient norm); the message names the iteration."""


def _logging_setup() -> None:
    """Log to stdout (INFO on rank 0, warnings elsewhere) unless the caller configured logging;
    condense megatron-core's start-up notes either way (``logging_utils.quiet_megatron_core``)."""
    rank = int(os.environ.get("RANK", "0"))
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO if rank == 0 else logging.WARNING,
            format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
            stream=sys.stdout,
        )
    logging_utils.quiet_megatron_core()


# ----------------------------------------------------------------------------------------------
# one step


def _loss_func(loss_mask: torch.Tensor, scale, output_tensor: torch.Tensor):
    """Reduce the model's ``[b, s_local]`` token losses (see the module docstring); ``scale`` a float,
    or a 0-dim tensor in a captured step (a float would be baked into the graph)."""
    losses = output_tensor.float()
    local_sum = (losses * loss_mask).sum()
    return local_sum * scale, loss_mask.sum().to(torch.int), {"lm loss sum": local_sum.detach()}


def _forward_step(scale: float, is_first: bool, is_last: bool, data_iterator, model):
    batch = next(data_iterator)
    if batch is not None and "loss_scale" in batch:
        scale = batch["loss_scale"]
    tokens = batch["tokens"] if (batch is not None and is_first) else None
    positions = batch["position_ids"] if (batch is not None and is_first) else None
    labels = batch["labels"] if (batch is not None and is_last) else None
    kwargs = {}
    if batch is not None and is_last:
        # the loss mask lets the fused loss compute its gradients in forward (it reduces as _loss_func)
        kwargs["loss_mask"] = batch["loss_mask"]
    if batch is not None and "cu_seqlens" in batch:
        # packed documents: every layer's attention reads the starts (data.py, "Packed documents")
        from megatron.core.packed_seq_params import PackedSeqParams

        kwargs["packed_seq_params"] = PackedSeqParams(
            qkv_format="sbhd", cu_seqlens_q=batch["cu_seqlens"], cu_seqlens_kv=batch["cu_seqlens"])
    output = model(tokens, position_ids=positions, attention_mask=None, labels=labels, **kwargs)
    if not is_last:
        return output, None
    return output, partial(_loss_func, batch["loss_mask"], scale)


def run_forward_backward(state: TrainState, dataset, consumed: int, forward_only: bool) -> float:
    """One global batch through the schedule; returns the global token-mean loss (NaN off the last stage)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config, groups, layout = state.config, state.groups, state.layout
    device = platform.default_device()
    is_first, is_last = mpu.is_pipeline_first_stage(), mpu.is_pipeline_last_stage()
    batches = data_mod.read_step(dataset, layout, consumed, device)
    scale, total_tokens = 0.0, float("nan")
    if is_last:
        total_tokens = data_mod.global_loss_tokens(batches, groups.dp, device)
        factor = 1.0 if config.parallel.ddp_impl == "megatron" else float(groups.dp_cp.size())
        scale = factor / max(total_tokens, 1.0)
    forward_backward = get_forward_backward_func()

    def step(micro_batches):
        with platform.cuda_factory_redirect():
            return forward_backward(
                forward_step_func=partial(_forward_step, scale, is_first, is_last),
                data_iterator=iter(micro_batches),  # one micro-batch per forward step
                model=[state.model],
                num_microbatches=layout.num_micro_batches,
                seq_length=config.training.seq_length,
                micro_batch_size=config.training.micro_batch_size,
                forward_only=forward_only,
            )

    if state.step_graph is not None and not forward_only:
        # the scale changes with the batch's loss tokens: a tensor the graph reads, not a constant in it
        loss_scale = torch.full((), scale, dtype=torch.float32, device=device)
        batches = [dict(b, loss_scale=loss_scale) for b in batches]
        outputs = state.step_graph.run(step, batches, state.iteration + 1)
    else:
        outputs = step(batches)
    if not is_last:
        return float("nan")
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for out in outputs:
        loss_sum += out["lm loss sum"].double()
    if groups.dp_cp.size() > 1:
        dist.all_reduce(loss_sum, group=groups.dp_cp)
    return float(loss_sum.item()) / max(total_tokens, 1.0)


def _broadcast_from_last_stage(value: float, groups) -> float:
    """Share a last-stage scalar with every stage of the pipeline group."""
    if groups.pp.size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=platform.default_device())
    dist.broadcast(t, src=dist.get_global_rank(groups.pp, groups.pp.size() - 1), group=groups.pp)
    return float(t.item())


def train_step(state: TrainState) -> tuple:
    """Forward/backward over the global batch, finalize, clip, step; returns (loss, grad_norm)."""
    state.model.train()
    state.optimizer.zero_grad()
    loss = run_forward_backward(state, state.train_ds, state.consumed_train_samples, forward_only=False)
    loss = _broadcast_from_last_stage(loss, state.groups)
    next_iteration = state.iteration + 1
    if not math.isfinite(loss):
        raise TrainingError(f"iteration {next_iteration}: lm loss is {loss}; stopping without saving "
                            f"({_last_checkpoint_hint(state.checkpoint.save)})")
    applied, grad_norm = state.optimizer.step()
    if state.config.training.fp16 and not applied:
        # dynamic loss scaling: an overflow skips the update and lowers the scale (as Megatron does)
        logger.info("iteration %d: fp16 overflow, update skipped", next_iteration)
        grad_norm = float("nan")
    elif not applied or not math.isfinite(grad_norm):
        raise TrainingError(f"iteration {next_iteration}: grad norm is {grad_norm}; stopping without saving")
    else:
        state.scheduler.step(1)
    state.iteration = next_iteration
    state.consumed_train_samples += state.config.training.global_batch_size
    return loss, grad_norm


def evaluate(state: TrainState) -> Optional[float]:
    """Mean token loss over ``--eval-iters`` validation batches (continuing through the valid set)."""
    if state.valid_ds is None:
        return None
    state.model.eval()
    total = 0.0
    eval_iters = state.config.logging.eval_iters
    with torch.no_grad():
        for _ in range(eval_iters):
            total += run_forward_backward(state, state.valid_ds, state.consumed_valid_samples, forward_only=True)
            state.consumed_valid_samples += state.config.training.global_batch_size
    if state.config.parallel.ddp_impl == "fsdp":
        fsdp_reshard(state.model)
    state.model.train()
    return _broadcast_from_last_stage(total / eval_iters, state.groups)


def _is_logging_rank(groups) -> bool:
    """The first rank (TP, SP and DP rank 0) of the last pipeline stage."""
    from megatron.core import parallel_state as mpu

    return (mpu.is_pipeline_last_stage() and groups.tp.rank() == 0 and groups.cp.rank() == 0
            and groups.dp.rank() == 0)


def train(state: TrainState, save_fn: Optional[Callable[[TrainState], None]] = None,
          stops: Optional[StopRequests] = None) -> TrainState:
    """Run iterations until ``--train-iters`` (or ``--exit-interval``, or ``stops`` says so: a signal
    with ``--exit-signal-handler``, ``--exit-duration-in-mins``); log, evaluate and save."""
    train_cfg, log_cfg, ckpt_cfg = state.config.training, state.config.logging, state.config.checkpoint
    train_iters = train_cfg.train_iters
    logging_rank = _is_logging_rank(state.groups)
    writer = None
    if log_cfg.tensorboard_dir and logging_rank:
        writer = logging_utils.TensorboardWriter(log_cfg.tensorboard_dir)
    flops_token = logging_utils.flops_per_token(state.model_config, state.padded_vocab_size,
                                                 seq_length=train_cfg.seq_length)
    tokens_per_iter = train_cfg.global_batch_size * train_cfg.seq_length
    on_gpu = torch.cuda.is_available()
    world = dist.get_world_size()
    watch = logging_utils.Stopwatch()
    window_iters, window_loss, window_norm = 0, 0.0, 0.0
    if state.iteration >= train_iters:
        logger.warning("nothing to do: the checkpoint is at iteration %d and --train-iters is %d "
                       "(raise --train-iters to train further)", state.iteration, train_iters)
        if writer:
            writer.close()
        return state
    history = None
    if log_cfg.record_memory_history and logging_rank:
        history = logging_utils.MemoryHistory(log_cfg.memory_snapshot_path)
        logger.info("recording the CUDA allocator's history: %s is written at each log line and at the end "
                    "(view it at pytorch.org/memory_viz)", log_cfg.memory_snapshot_path)
    try:
        while state.iteration < train_iters:
            loss, grad_norm = train_step(state)
            state.losses.append(loss)
            state.grad_norms.append(grad_norm)
            window_iters += 1
            window_loss += loss
            window_norm += grad_norm
            it = state.iteration
            if it % log_cfg.log_interval == 0 or it == train_iters:
                elapsed = watch.lap()
                ms = 1000.0 * elapsed / window_iters
                tokens_s = tokens_per_iter * window_iters / max(elapsed, 1e-9)
                tflops = flops_token * tokens_s / world / 1e12
                mfu = tflops * 1e12 / log_cfg.peak_flops if on_gpu else None
                lr = state.optimizer.param_groups[0]["lr"]
                if logging_rank:
                    line = logging_utils.format_log_line(
                        iteration=it, train_iters=train_iters,
                        consumed_samples=state.consumed_train_samples, ms_per_iter=ms, lr=lr,
                        loss=window_loss / window_iters, grad_norm=window_norm / window_iters,
                        tokens_per_s=tokens_s, tflops_per_gpu=tflops, mfu=mfu,
                        mem_gib=logging_utils.memory_gib(),
                    )
                    print(line, flush=True)
                    if history:
                        history.dump()
                        watch.lap()  # the dump's time stays out of the next window's throughput
                    if writer:
                        writer.add_scalars({"lm loss": window_loss / window_iters, "learning-rate": lr,
                                            "grad-norm": window_norm / window_iters, "tokens-per-s": tokens_s,
                                            "tflops-per-gpu": tflops}, it)
                window_iters, window_loss, window_norm = 0, 0.0, 0.0
            if log_cfg.eval_interval and it % log_cfg.eval_interval == 0 and it < train_iters:
                _run_eval(state, logging_rank, writer, "iteration", it)
                watch.lap()
            stop = stops.check() if stops is not None else None
            if stop is None and train_cfg.exit_interval is not None and it % train_cfg.exit_interval == 0:
                stop = f"--exit-interval {train_cfg.exit_interval}"
            exiting = stop is not None
            if save_fn and ckpt_cfg.save and (
                (ckpt_cfg.save_interval and it % ckpt_cfg.save_interval == 0) or it == train_iters or exiting
            ):
                check_before_save(state)
                save_fn(state)
                watch.lap()
            if exiting:
                saved = f", saved to {ckpt_cfg.save}" if save_fn and ckpt_cfg.save else ""
                logger.info("exiting at iteration %d: %s%s", it, stop, saved)
                break
        if log_cfg.eval_interval and state.iteration == train_iters:
            _run_eval(state, logging_rank, writer, "end of training, iteration", state.iteration)
    finally:
        if writer:
            writer.close()
        if history:  # also after an error (out of memory: what the snapshot is for)
            try:
                history.dump()
            except OSError as err:  # never in place of the error that ended the run
                logger.warning("--memory-snapshot-path %s: not written (%s)", log_cfg.memory_snapshot_path, err)
            history.stop()
    return state


def check_before_save(state: TrainState) -> None:
    """Raise :class:`TrainingError` rather than save weights that are already blown up.

    Every rank checks its parameters for NaN/inf, and one forward pass (no update, eval mode)
    over the next training batch checks that the weights to be saved give a finite loss; with
    ``--check-for-spiky-loss`` that loss must also stay below ``--spiky-loss-factor`` x the
    lowest loss of this run. Collective (all ranks decide together).
    """
    iteration = state.iteration
    ckpt_cfg = state.config.checkpoint
    bad = torch.zeros(1, dtype=torch.float32, device=platform.default_device())
    for p in unwrap_model(state.model).parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if local.numel() and not bool(torch.isfinite(local.detach()).all()):
            bad.fill_(1.0)
            break
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    last = _last_checkpoint_hint(state.checkpoint.save)
    if bad.item():
        raise TrainingError(f"iteration {iteration}: the weights hold NaN/inf; stopping without saving ({last})")
    state.model.eval()
    with torch.no_grad():
        loss = run_forward_backward(state, state.train_ds, state.consumed_train_samples, forward_only=True)
    if state.config.parallel.ddp_impl == "fsdp":
        fsdp_reshard(state.model)
    state.model.train()
    loss = _broadcast_from_last_stage(loss, state.groups)
    if not math.isfinite(loss):
        raise TrainingError(f"iteration {iteration}: the weights to be saved give lm loss {loss} on the next "
                            f"batch; stopping without saving ({last})")
    previous = [x for x in state.losses if math.isfinite(x)]
    if ckpt_cfg.check_for_spiky_loss and previous and loss > ckpt_cfg.spiky_loss_factor * min(previous):
        raise TrainingError(f"iteration {iteration}: lm loss {loss:.4g} of the weights to be saved is more than "
                            f"--spiky-loss-factor {ckpt_cfg.spiky_loss_factor:g} x the lowest loss {min(previous):.4g}; "
                            f"stopping without saving ({last})")


def _last_checkpoint_hint(save: Optional[str]) -> str:
    its = checkpointing.list_iterations(save) if save else []
    return f"last good checkpoint: iteration {its[-1]}, untouched" if its else "no checkpoint saved"


def _run_eval(state, logging_rank, writer, what, it) -> None:
    loss = evaluate(state)
    if loss is None:
        return
    if logging_rank:
        ppl = math.exp(min(loss, 20.0))
        print(f" validation loss at {what} {it} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |",
              flush=True)
        if writer:
            writer.add_scalars({"validation lm loss": loss, "validation ppl": ppl}, it)


def main(argv: Optional[List[str]] = None, *, destroy: bool = True) -> TrainState:
    """Train as ``pretrain_linear_lm.py`` does; returns the final :class:`TrainState`.

    Args:
        argv: the flags (default ``sys.argv[1:]``).
        destroy: tear down the process groups at the end (tests that spawn ranks keep them).

    Raises:
        SystemExit(2): bad flags; :class:`TrainingError`: a non-finite loss or gradient norm, a bad
        batch, or a save the checkpoint code refused (its one-line message).
    """
    from megatron_lasp.parallel.state import destroy_parallel

    start = time.monotonic()
    # An earlier run in this process (tests, notebooks) that its caller has dropped is cyclic
    # garbage (megatron-core's DDP and optimizer hooks refer back to their owners): its GPU memory
    # returns only when Python's cycle collector runs, which it may not do before this run's model
    # is built. Collect now.
    gc.collect()
    _logging_setup()
    state = None
    save_lock = checkpointing.SaveLock()
    # --deterministic-mode switches torch's global flag on: this run only, not the caller's later code
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        state = setup(argv, save_lock, start)
        state.stops.install()
        watchdog = LauncherWatchdog.start_if_launched(save_lock.release)
        save_fn = checkpointing.save_checkpoint
        if watchdog is not None:
            save_fn = watchdog.guard(save_fn)
        try:
            train(state, save_fn=save_fn, stops=state.stops)
        except (data_mod.DataError, checkpointing.CheckpointError, GraphCaptureError) as err:
            # a batch, a save refused, a step that a CUDA graph cannot hold
            raise TrainingError(str(err)) from None
        finally:
            if watchdog is not None:
                watchdog.stop()
    finally:
        if state is not None:
            state.stops.uninstall()
            if state.step_graph is not None:
                state.step_graph.close()
        save_lock.release()
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        if destroy:
            destroy_parallel()
    return state


def _let_rank_zero_print() -> None:
    # every rank fails together; torchrun stops the others at the first exit, which must not
    # come before rank 0 has printed the line
    if not arguments_mod.is_rank_zero():
        time.sleep(1.0)


def cli_main(argv: Optional[List[str]] = None) -> int:
    """``pretrain_linear_lm.py``: :func:`main` with every way it ends as an exit status, and a clean
    end as one line on stderr (no traceback): 0 done (or stopped on request, saved), 1 training
    stopped (non-finite loss, data), 2 a user mistake, 130 interrupted (Ctrl-C without
    ``--exit-signal-handler``). Under torchrun the line also goes to its error file."""
    try:
        main(argv)
    except StartupError as err:  # already printed (rank 0)
        record_clean_error(f"{PROG}: error: {err.message}", err.code)
        _let_rank_zero_print()
        return err.code
    except arguments_mod.UsageError as err:  # argparse's own, already printed (rank 0)
        record_clean_error(err.message, 2)
        _let_rank_zero_print()
        return 2
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        record_clean_error(f"error: {err}", 1)
        return 1
    except KeyboardInterrupt:
        message = (f"{PROG}: interrupted; nothing saved since the last checkpoint (add --exit-signal-handler to "
                   "save on Ctrl-C / SIGTERM)")
        if arguments_mod.is_rank_zero():
            print(f"\n{message}", file=sys.stderr, flush=True)
        record_clean_error(message, 130)
        return 130
    return 0
