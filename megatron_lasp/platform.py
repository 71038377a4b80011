"""The small CPU platform layer megatron-core needs on a machine without CUDA.

megatron-core is written for CUDA. On a CPU-only machine (CI, laptops, the gloo tests) a handful of
its code paths assume a GPU; everything else (``parallel_state``, TP layers, datasets,
``dist_checkpointing``) works unchanged. This module holds *all* of the CPU accommodations; none of
them does anything when CUDA is available. Each piece, and why:

- :func:`cpu_platform` (a context, entered only by :func:`megatron_lasp.parallel.initialize_parallel`
  and left by :func:`megatron_lasp.parallel.destroy_parallel`, i.e. for the life of megatron-core's
  parallel state, which is when megatron-core code runs). Inside it:

  - ``torch.cuda.current_device`` returns ``cpu``: megatron-core allocates buffers with
    ``device=torch.cuda.current_device()`` (the global memory buffer of TP sequence parallelism,
    ``gather_from_sequence_parallel_region``, the DDP grad buffers); on CPU the call raises
    "Torch not compiled with CUDA enabled".
  - ``torch.cuda.synchronize`` does nothing: ``dist_checkpointing``'s filesystem writer
    synchronizes the device before writing.
  - megatron-core's ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``
    return an empty state / do nothing: activation recomputation (``tensor_parallel.checkpoint``,
    ``CheckpointWithoutOutput``) saves and restores the CUDA generator through them. The CPU
    generator and the (CPU) tracker states are saved and restored by the same code already, so
    recomputation replays the same random numbers.

- :func:`seed_model_parallel_rng`: megatron-core's own ``model_parallel_cuda_manual_seed``; on CPU
  it runs with :class:`CPURNGStatesTracker` in place of ``CudaRNGStatesTracker``, so the tracker
  holds CPU generator states under megatron-core's names and seeds.
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
import functools
import logging
from typing import Any, Iterator, List, Tuple

import torch

logger = logging.getLogger(__name__)


def is_cpu_platform() -> bool:
    """True when there is no usable CUDA device, i.e. when the CPU layer is (to be) active."""
    return not torch.cuda.is_available()


def default_device() -> torch.device:
    """The device this process computes on: ``cuda:<current>`` on GPU, ``cpu`` otherwise."""
    if is_cpu_platform():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


@contextlib.contextmanager
def _replaced(patches: List[Tuple[Any, str, Any]]) -> Iterator[None]:
    """Set ``obj.name = value`` for each patch; restore the previous values on exit."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def _no_op(*args, **kwargs) -> None:
    return None


def _no_cuda_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


@contextlib.contextmanager
def cpu_platform() -> Iterator[bool]:
    """On CPU, answer megatron-core's CUDA calls on the CPU inside this context (module docstring).

    Yields:
        True if the CPU layer is active (no CUDA), False on GPU, where nothing is changed.
    """
    if not is_cpu_platform():
        yield False
        return
    from megatron.core.tensor_parallel import random as mpu_random

    with _replaced([
        (torch.cuda, "current_device", _cpu_device),
        (torch.cuda, "synchronize", _no_op),
        (mpu_random, "_get_cuda_rng_state", _no_cuda_rng_state),
        (mpu_random, "_set_cuda_rng_state", _no_op),
    ]):
        logger.debug("CPU platform layer active for megatron-core (no CUDA device)")
        yield True


@functools.lru_cache(maxsize=None)
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

    Both run megatron-core's ``model_parallel_cuda_manual_seed`` (data-parallel state: ``seed``;
    tensor-parallel: ``seed + 2718 + tp_rank``; expert-parallel: ``seed + 1024 + ...``). On CPU its
    tracker is a :class:`CPURNGStatesTracker`, whose states are CPU generators seeded alike, so
    TP-sharded initialization is seeded the same way on CPU and GPU runs of one seed.
    Call after megatron-core's parallel state is initialized.
    """
    from megatron.core.tensor_parallel import random as mpu_random

    torch.manual_seed(seed)
    swap = []
    if is_cpu_platform():
        swap = [(mpu_random, "CudaRNGStatesTracker", _cpu_rng_tracker_class())]
    with _replaced(swap):
        mpu_random.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


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
