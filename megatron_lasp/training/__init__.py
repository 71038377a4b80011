"""The training entry point's library: flags, data, optimizers, the loop and checkpoints.

``pretrain_linear_lm.py`` calls :func:`main`; tests call it in spawned ranks. The HF converter
calls :func:`load_model_for_inference`.
"""

from megatron_lasp.training.checkpointing import load_model_for_inference
from megatron_lasp.training.loop import TrainingError, cli_main, main

__all__ = ["TrainingError", "cli_main", "load_model_for_inference", "main"]
