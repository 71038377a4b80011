"""The whole forward-backward of a training step captured in one CUDA graph and replayed.

``--cuda-graph-impl local --cuda-graph-scope full_iteration`` (megatron-core's flag names): at
short sequences a step is bound by the host launching its kernels (at 8K tokens of TNL-1B about
14% of the step is GPU idle time between kernels); a replayed graph launches them all at once.
The optimizer step stays eager (a handful of fused kernels).

How it runs. The first ``--cuda-graph-warmup-steps`` steps run eagerly (Triton's autotuning and
compilation happen there, and the caching allocator warms up). The next step copies its batches
into static tensors, captures ``forward_backward`` of them into a ``torch.cuda.CUDAGraph`` and
replays it; every later step copies its batches into the same tensors and replays. What the
captured step returns (the per-micro-batch loss sums) lives in the graph's memory and is read
after each replay. A replay runs the same kernels on the same shapes as the eager step, so it
computes the same bits (the GPU tests compare the two runs' losses, gradient norms and weights).

Why not megatron-core's ``FullCudaGraphWrapper``: it captures on a stream of its own. The
gradient-accumulation nodes that megatron's DDP makes when it wraps the model (its backward hooks
hang on them) keep the stream current at that time, and the autograd engine runs them there:
inside a capture on another stream that work would leave the graph (torch releases newer than
ours can override those streams at capture time; the 0.19 wrapper asks for that). Here one side
stream is made current before the model is built and the same stream captures, so every node of
the backward is on the capturing stream.

What a graph cannot hold (refused at start-up by the run config's checks): host synchronisation
inside the step (packed documents read their starts on the host), communication inside the step
(sequence / pipeline parallelism; megatron DDP reduces gradients after the step, outside the
graph, so data parallelism is fine), parameters that change address (torch DDP / FSDP), host
memory traffic (``--cpu-offloading``), random numbers (dropout), and fp16's loss scale (a new
tensor after each update).
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional

import torch

logger = logging.getLogger(__name__)

Batch = Dict[str, object]


class GraphCaptureError(RuntimeError):
    """Capturing the step failed (something in it is not graph-safe); the message says what to do."""


class StepGraph:
    """One training step's forward-backward, captured once and replayed (see the module docstring).

    Make it before the model is built: it makes a side stream current for the whole run.

    Args:
        warmup_steps: eager steps before the capture (at least 1: Triton compiles and autotunes there).
    """

    def __init__(self, warmup_steps: int) -> None:
        if warmup_steps < 1:
            raise ValueError("warmup_steps must be >= 1")
        self.warmup_steps = warmup_steps
        self.eager_steps = 0
        self.replays = 0
        self.capture_iteration: Optional[int] = None
        self._previous_stream = torch.cuda.current_stream()
        self.stream = torch.cuda.Stream()
        torch.cuda.set_stream(self.stream)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static: Optional[List[Batch]] = None
        self.outputs = None

    @property
    def captured(self) -> bool:
        """Whether the step was captured (it stays True after :meth:`close`)."""
        return self.capture_iteration is not None

    def close(self) -> None:
        """At the end of the run: free the graph and its memory, make the previous stream current again."""
        self.stream.synchronize()
        self.graph = self.static = self.outputs = None
        torch.cuda.set_stream(self._previous_stream)

    def run(self, step: Callable[[List[Batch]], object], batches: List[Batch], iteration: int):
        """``step(batches)``: eager during the warm-up, then captured (once) and replayed."""
        if self.graph is None:
            if self.eager_steps < self.warmup_steps:
                self.eager_steps += 1
                return step(batches)
            self._capture(step, batches, iteration)
        else:
            self._load(batches)
        self.graph.replay()
        self.replays += 1
        return self.outputs

    def _capture(self, step, batches: List[Batch], iteration: int) -> None:
        self.static = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
                       for b in batches]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self.outputs = step(self.static)
        except Exception as err:  # noqa: BLE001 - any failure inside the capture means the same thing
            # the capture's end reports "a previous error during capture": name that first error
            while err.__context__ is not None:
                err = err.__context__
            logger.warning("the CUDA graph capture failed here", exc_info=(type(err), err, err.__traceback__))
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise GraphCaptureError(
                f"iteration {iteration}: capturing the step in a CUDA graph failed ({first}); "
                "run without --cuda-graph-impl") from None
        self.graph = graph
        self.capture_iteration = iteration
        logger.info("iteration %d: the forward-backward step is captured in a CUDA graph (after %d eager "
                    "steps); later steps replay it", iteration, self.eager_steps)

    def _load(self, batches: List[Batch]) -> None:
        if len(batches) != len(self.static):
            raise GraphCaptureError(f"the captured step has {len(self.static)} micro-batches, this one "
                                    f"{len(batches)}; run without --cuda-graph-impl")
        for into, batch in zip(self.static, batches):
            if into.keys() != batch.keys():
                raise GraphCaptureError("a batch's fields changed after the capture "
                                        f"({sorted(into)} -> {sorted(batch)}); run without --cuda-graph-impl")
            for key, value in batch.items():
                if not isinstance(value, torch.Tensor):
                    continue
                target = into[key]
                if target.shape != value.shape or target.dtype != value.dtype:
                    raise GraphCaptureError(
                        f"batch field {key!r} is {tuple(value.shape)} {value.dtype} but the graph was "
                        f"captured with {tuple(target.shape)} {target.dtype}; run without --cuda-graph-impl")
                target.copy_(value, non_blocking=True)
