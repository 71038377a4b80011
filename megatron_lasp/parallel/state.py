"""One call that brings up torch.distributed and megatron-core's parallel state.

The LASP (sequence-parallel) group *is* megatron-core's context-parallel group; its rank order is
megatron-core's default ``tp-cp-ep-dp-pp``, so with TP > 1 the SP ranks are strided in global rank
(peers must always be taken from the group, never global rank +- 1).

Usage (under ``torchrun``, or a plain ``python`` for a single process)::

    groups = initialize_parallel(tensor_model_parallel_size=2, sequence_parallel_size=2)
    o = lightning_attn_sp(q, k, v, slopes, groups.cp)

The groups are megatron-core's own ``ProcessGroupCollection``, built once here and passed explicitly
(to the model as its ``pg_collection``, to the data-parallel wrapper, the optimizer, the loop). The
fields used by this package are ``tp``, ``cp`` (the LASP group), ``dp`` (without the SP ranks),
``dp_cp`` (data x sequence: parameter gradients are reduced over it), ``pp`` and ``mp`` (TP x PP);
every one is a ``torch.distributed.ProcessGroup`` that contains this rank (``group.rank()``,
``group.size()``).

Devices: under NCCL each local rank owns GPU ``LOCAL_RANK`` (NCCL refuses two ranks on one
device). Under gloo with CUDA, ranks may outnumber the GPUs and share them (``LOCAL_RANK %
device_count``): gloo's collectives take CUDA tensors and the package's point-to-point stages them
through host memory (:func:`megatron_lasp.parallel.comm.send_state`), so every layout runs on one
GPU, slowly, to check it before renting several.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from megatron_lasp import platform

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection

logger = logging.getLogger(__name__)


def validate_parallel_sizes(
    world_size: int,
    tensor_model_parallel_size: int = 1,
    sequence_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
) -> int:
    """Check that the parallel sizes fit the world; return the data-parallel size.

    (How the heads split over the groups is the model config's rule,
    :func:`megatron_lasp.models.config.check_head_split`; the sequence length's is the layout's,
    :func:`megatron_lasp.parallel.layout.check_sequence_split`.)

    Raises:
        ValueError: naming the argument, when a size is not positive or the sizes do not divide
            the world size.
    """
    sizes = {
        "tensor_model_parallel_size": tensor_model_parallel_size,
        "sequence_parallel_size": sequence_parallel_size,
        "pipeline_model_parallel_size": pipeline_model_parallel_size,
    }
    for name, size in sizes.items():
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive integer, got {size!r}")
    model_parallel = tensor_model_parallel_size * sequence_parallel_size * pipeline_model_parallel_size
    if world_size % model_parallel != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size "
            f"({tensor_model_parallel_size}) x sequence_parallel_size ({sequence_parallel_size}) x "
            f"pipeline_model_parallel_size ({pipeline_model_parallel_size}) = {model_parallel}; change "
            f"these sizes or the number of processes (torchrun --nproc-per-node)"
        )
    return world_size // model_parallel


# The CPU platform layer (megatron_lasp.platform.cpu_platform), held from initialize_parallel to
# destroy_parallel: the life of megatron-core's parallel state. Does nothing on GPU.
_PLATFORM: Optional[contextlib.ExitStack] = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BACKEND_ENV = "MEGATRON_LASP_DIST_BACKEND"
"""Environment variable naming the default torch.distributed backend ("nccl" or "gloo")."""


def resolve_backend(backend: Optional[str] = None) -> str:
    """``backend``, else ``$MEGATRON_LASP_DIST_BACKEND``, else NCCL with CUDA and gloo without."""
    backend = backend or os.environ.get(BACKEND_ENV)
    return backend or ("nccl" if torch.cuda.is_available() else "gloo")


def local_device(backend: str, local_rank: int, device_count: int, local_world_size: int = 1) -> Optional[int]:
    """The GPU index of a local rank (None without GPUs).

    NCCL: the rank's own GPU, ``local_rank``. gloo: ``local_rank % device_count`` (ranks share GPUs).

    Raises:
        ValueError: NCCL with more local ranks (``max(local_rank + 1, local_world_size)``) than GPUs.
    """
    if device_count < 1:
        return None
    if backend != "nccl":
        return local_rank % device_count
    ranks = max(local_rank + 1, local_world_size)
    if ranks > device_count:
        raise ValueError(
            f"{ranks} processes on this node but {device_count} visible GPU(s): the nccl backend needs one "
            f"GPU per process; start at most {device_count} per node (torchrun --nproc-per-node), or use the "
            f"gloo backend (--distributed-backend gloo) to let ranks share GPUs (a correctness check, not a "
            f"fast path)")
    return local_rank


def init_distributed(backend: Optional[str] = None, timeout_minutes: int = 30) -> None:
    """Initialise the default process group if it is not initialised yet.

    Reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``,
    ``LOCAL_RANK``). Without it (plain ``python``), starts a one-process group.

    Args:
        backend: "nccl" or "gloo"; default NCCL when CUDA is available, gloo otherwise; the
            environment variable ``MEGATRON_LASP_DIST_BACKEND`` overrides the default.
        timeout_minutes: collective timeout.

    Sets this process's CUDA device (:func:`local_device`: its own GPU under NCCL, shared under gloo).

    Raises:
        ValueError: NCCL without CUDA, or with more processes on the node than GPUs.
    """
    if dist.is_initialized():
        return
    backend = resolve_backend(backend)
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("the nccl backend needs CUDA devices; use the gloo backend on CPU")
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if torch.cuda.is_available():
        device = local_device(backend, int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count(),
                              int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    sequence_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    *,
    backend: Optional[str] = None,
    seed: Optional[int] = None,
    timeout_minutes: int = 30,
) -> ProcessGroupCollection:
    """Initialise torch.distributed and megatron-core's parallel state; return the groups.

    Args:
        tensor_model_parallel_size: TP size.
        sequence_parallel_size: LASP group size (megatron-core's ``context_parallel_size``).
        pipeline_model_parallel_size: PP size. The data-parallel size is what is left.
        backend: see :func:`init_distributed`.
        seed: if given, seed torch and megatron-core's model-parallel RNG tracker.
        timeout_minutes: collective timeout.

    Returns:
        megatron-core's ``ProcessGroupCollection`` of this rank (every group of its parallel state).

    On a machine without CUDA this also enters the CPU platform layer
    (:func:`megatron_lasp.platform.cpu_platform`) until :func:`destroy_parallel`; on gloo with CUDA
    it provides megatron-core's pipeline hook ``torch.distributed.ring_exchange``
    (:func:`megatron_lasp.parallel.comm.pipeline_ring_exchange`, see :func:`pipeline_p2p_staged`) and
    runs megatron-core's data-parallel collectives uncoalesced
    (:func:`megatron_lasp.parallel.comm.uncoalesced_gloo_collectives`).

    Raises:
        ValueError: when the sizes do not divide the world size (the message names the argument).
    """
    init_distributed(backend, timeout_minutes)
    validate_parallel_sizes(
        dist.get_world_size(),
        tensor_model_parallel_size,
        sequence_parallel_size,
        pipeline_model_parallel_size,
    )
    global _PLATFORM
    if _PLATFORM is None:
        _PLATFORM = contextlib.ExitStack()
        _PLATFORM.enter_context(platform.cpu_platform())
        if torch.cuda.is_available() and dist.get_backend() == "gloo":
            from megatron_lasp.parallel.comm import pipeline_ring_exchange, uncoalesced_gloo_collectives

            _PLATFORM.enter_context(pipeline_ring_exchange())
            _PLATFORM.enter_context(uncoalesced_gloo_collectives())
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=sequence_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    if seed is not None:
        platform.seed_model_parallel_rng(seed)
    groups = current_groups()
    logger.info(
        "parallel state: world %d = TP %d x SP %d x DP %d x PP %d (backend %s)",
        dist.get_world_size(),
        groups.tp.size(),
        groups.cp.size(),
        groups.dp.size(),
        groups.pp.size(),
        dist.get_backend(),
    )
    return groups


def pipeline_p2p_staged(groups: ProcessGroupCollection) -> bool:
    """Whether megatron-core's pipeline point-to-point must take ``config.use_ring_exchange_p2p``
    (:func:`megatron_lasp.parallel.comm.ring_exchange`, through host memory): PP > 1 on gloo with CUDA."""
    return groups.pp.size() > 1 and torch.cuda.is_available() and dist.get_backend(groups.pp) == "gloo"


def current_groups() -> ProcessGroupCollection:
    """The groups of an already initialised megatron-core parallel state."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


def destroy_parallel() -> None:
    """Tear down megatron-core's parallel state and the default process group; leave the CPU layer."""
    global _PLATFORM
    from megatron.core import parallel_state as mpu

    mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    if _PLATFORM is not None:
        _PLATFORM.close()
        _PLATFORM = None
