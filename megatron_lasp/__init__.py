"""megatron-lasp: Linear Attention Sequence Parallelism (LASP) on top of megatron-core."""

__version__ = "0.1.0"
