"""The training entry point's library: flags, data, optimizers and the loop.

``pretrain_linear_lm.py`` calls :func:`main`; tests call it in spawned ranks. Checkpoints are
:mod:`megatron_lasp.checkpoint`'s (its one-process loader is re-exported here for callers of
``megatron_lasp.training.load_model_for_inference``).
"""

from megatron_lasp.checkpoint.io import load_model_for_inference
from megatron_lasp.training.loop import TrainingError, cli_main, main

__all__ = ["TrainingError", "cli_main", "load_model_for_inference", "main"]
