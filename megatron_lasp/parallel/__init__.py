"""Parallel state (TP / SP / DP / PP on megatron-core) and the sequence-parallel modes (of lightning
attention, ``lightning_attn_sp``, and of the gated delta rule, ``gated_delta_rule_sp``)."""

from megatron_lasp.parallel.delta_sp import gated_delta_rule_sp
from megatron_lasp.parallel.layout import gather_sequence, sequence_slice_bounds, split_sequence
from megatron_lasp.parallel.sp import SEQUENCE_PARALLEL_MODES, lightning_attn_sp
from megatron_lasp.parallel.state import (
    current_groups,
    destroy_parallel,
    init_distributed,
    initialize_parallel,
    validate_parallel_sizes,
)

__all__ = [
    "SEQUENCE_PARALLEL_MODES",
    "current_groups",
    "destroy_parallel",
    "gather_sequence",
    "gated_delta_rule_sp",
    "init_distributed",
    "initialize_parallel",
    "lightning_attn_sp",
    "sequence_slice_bounds",
    "split_sequence",
    "validate_parallel_sizes",
]
