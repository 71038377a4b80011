"""The small CPU platform layer megatron-core needs on a machine without CUDA.

megatron-core is written for CUDA. On a CPU-only machine (CI, laptops, the gloo tests) a handful of
its code paths assume a GPU; everything else (``parallel_state``, TP layers, datasets,
``dist_checkpointing``) works unchanged. This module holds *all* of the CPU accommodations, so they
are in one place and none of them is active when CUDA is available. Each piece, and why:

- ``torch.cuda.current_device`` -> ``cpu``: megatron-core allocates buffers with
  ``device=torch.cuda.current_device()`` (the global memory buffer used by TP sequence parallelism,
  ``gather_from_sequence_parallel_region``, the DDP grad buffers). On CPU the call raises
  "Torch not compiled with CUDA enabled"; returning the CPU device makes those buffers CPU tensors.
- ``torch.cuda.synchronize`` -> no-op: ``dist_checkpointing``'s filesystem writer synchronizes the
  device before writing; there is nothing to synchronize on CPU.
- A CPU RNG tracker: megatron-core forks a "model-parallel" RNG state for TP-sharded weight init
  and dropout through ``get_cuda_rng_tracker()``, which stores CUDA generator states. The CPU
  tracker keeps CPU generator states under the same names and seeds
  (see :func:`seed_model_parallel_rng`).
- The default causal mask: ``megatron.core.transformer.utils.get_default_causal_mask`` builds its
  mask with ``device="cuda"``; we rebuild it on CPU (patched where it is imported, too).
- The CUDA RNG state of activation checkpointing: megatron-core's ``tensor_parallel.checkpoint``
  (full recompute, selective recompute of the attention core / MLP) and ``CheckpointWithoutOutput``
  save and restore ``torch.cuda`` RNG states through ``random._get_cuda_rng_state`` /
  ``_set_cuda_rng_state``, which raise without CUDA. On CPU they return an empty state / do
  nothing: the CPU generator state and the (CPU) tracker states are saved and restored by the same
  code already, so recomputation replays the same random numbers.
- :func:`tensor_cuda_passthrough` (a context, entered only around megatron-core's
  ``LanguageModule.setup_embeddings_and_output_layer`` by ``megatron_lasp.models``): with tied
  embeddings and pipeline parallelism that method moves the last stage's copy of the embedding with
  ``weight.data.cuda()`` before all-reducing it over the embedding group; inside the context
  ``Tensor.cuda`` returns the tensor itself, so the copy stays on the CPU.
- :func:`cuda_factory_redirect` (a context, entered only around megatron-core's pipeline
  schedules by the training loop): the schedules create their token counter with
  ``torch.zeros(..., device="cuda")``; inside the context, factory calls that name a CUDA device
  get the CPU instead.
"""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)

_INSTALLED = False


def is_cpu_platform() -> bool:
    """True when there is no usable CUDA device, i.e. when the CPU layer is (to be) active."""
    return not torch.cuda.is_available()


def default_device() -> torch.device:
    """The device this process computes on: ``cuda:<current>`` on GPU, ``cpu`` otherwise."""
    if is_cpu_platform():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _no_cuda_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


def _set_no_cuda_rng_state(*args, **kwargs) -> None:
    return None


def setup_cpu_platform() -> bool:
    """Install the CPU accommodations described in the module docstring. Idempotent.

    Returns:
        True if the CPU layer is active (no CUDA), False on GPU, where nothing is changed.
    """
    global _INSTALLED
    if not is_cpu_platform():
        return False
    if _INSTALLED:
        return True
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None

    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.transformer.utils as transformer_utils

    transformer_utils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask

    import megatron.core.tensor_parallel.random as mpu_random

    mpu_random._get_cuda_rng_state = _no_cuda_rng_state
    mpu_random._set_cuda_rng_state = _set_no_cuda_rng_state
    _INSTALLED = True
    logger.info("CPU platform layer installed for megatron-core (no CUDA device)")
    return True


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mpu_random

    class CPURNGStatesTracker(mpu_random.CudaRNGStatesTracker):
        """``CudaRNGStatesTracker`` that keeps CPU generator states under the same names."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise ValueError(f"RNG seed {seed} is already tracked")
            if name in self.states_:
                raise ValueError(f"RNG state {name!r} is already tracked")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mpu_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise KeyError(f"RNG state {name!r} was not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CPURNGStatesTracker


def seed_model_parallel_rng(seed: int) -> None:
    """Seed torch and megatron-core's model-parallel RNG tracker, on GPU or CPU.

    On GPU this is megatron-core's ``model_parallel_cuda_manual_seed``. On CPU the tracker holds
    CPU states seeded exactly as megatron-core seeds its CUDA ones (data-parallel: ``seed``;
    tensor-parallel: ``seed + 2718 + tp_rank``; expert-parallel: ``seed + 1024 + 100 * ep_rank +
    etp_rank``), so TP-sharded initialization is the same on CPU and GPU runs of one seed.
    Call after megatron-core's parallel state is initialized.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mpu_random

    torch.manual_seed(seed)
    if not is_cpu_platform():
        torch.cuda.manual_seed(seed)
        mpu_random.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
        return
    setup_cpu_platform()
    tracker = _cpu_rng_tracker_class()()
    mpu_random._CUDA_RNG_STATE_TRACKER = tracker
    mpu_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    tracker.add(mpu_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mpu_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mpu_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)


_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "ones_like",
              "empty_like", "full_like")


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


@contextlib.contextmanager
def cuda_factory_redirect():
    """On CPU: inside this context, tensor factories called with a CUDA ``device`` use the CPU.

    A no-op context on GPU. Used around megatron-core's forward/backward schedules, which allocate
    small bookkeeping tensors with ``device="cuda"``.
    """
    if not is_cpu_platform():
        yield
        return
    from torch.overrides import TorchFunctionMode

    names = {getattr(torch, n) for n in _FACTORIES}

    class _Redirect(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func in names and _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = torch.device("cpu")
            return func(*args, **kwargs)

    with _Redirect():
        yield


@contextlib.contextmanager
def tensor_cuda_passthrough():
    """On CPU: inside this context ``Tensor.cuda()`` returns the tensor unchanged. No-op on GPU."""
    if not is_cpu_platform():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original
