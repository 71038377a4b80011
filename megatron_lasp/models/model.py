"""The linear LM: megatron-core's ``GPTModel`` with the linear-attention block spec.

``build_linear_lm`` is the entry point (documented in ``megatron_lasp/models/__init__.py``).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.utils import WrappedTensor

from megatron_lasp import platform
from megatron_lasp.models.config import LinearLMConfig
from megatron_lasp.models.loss import linear_cross_entropy
from megatron_lasp.models.offload import LayerInputOffloader
from megatron_lasp.models.specs import get_linear_lm_block_spec

__all__ = ["LinearLM", "build_linear_lm"]

logger = logging.getLogger(__name__)


class LinearLM(GPTModel):
    """``GPTModel`` (vocab-parallel embedding, decoder block, output layer, vocab-parallel cross
    entropy) with no position embedding and the linear-attention layers.

    ``forward`` takes this rank's contiguous sequence slice; see :func:`build_linear_lm`.
    """

    offload_min_bytes: int = 1 << 20
    """With ``config.offload_layer_inputs``: saved tensors smaller than this stay on the device."""

    def forward(
        self,
        input_ids: Optional[torch.Tensor],
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> torch.Tensor:
        """Run this pipeline stage on this rank's slice.

        Args:
            input_ids: ``[b, s_local]`` token ids (first stage; ignored on later stages, whose
                input comes from ``set_input_tensor``).
            position_ids: ignored (no position embedding; the decay carries position).
            attention_mask: ignored (the attention is causal by construction).
            labels: ``[b, s_local]`` next-token ids, or None.
            **kwargs: passed to ``GPTModel.forward`` (e.g. ``decoder_input``, ``loss_mask``). With
                the fused loss (default), a ``loss_mask`` given here lets the loss compute its
                gradients in the forward pass; the caller must then reduce the returned losses as
                ``c * sum(loss_mask * loss)`` (the training loop does; anything else raises in backward).

        Returns:
            Last stage: per-token loss ``[b, s_local]`` fp32 when ``labels`` are given, else logits
            ``[b, s_local, vocab / tp]`` (vocab-parallel: this TP rank's slice of the vocabulary). Other stages: the
            hidden states ``[s_local / tp_sp, b, hidden]`` for the next stage.
        """
        offloader = self._layer_input_offloader()
        if offloader is None:
            return super().forward(input_ids, position_ids, attention_mask, labels=labels, **kwargs)
        with offloader.hooks():
            return super().forward(input_ids, position_ids, attention_mask, labels=labels, **kwargs)

    def _layer_input_offloader(self) -> Optional[LayerInputOffloader]:
        """The offloader of ``config.offload_layer_inputs`` (training with gradients only), or None.

        Its saved-tensor hooks wrap the whole forward but move tensors only while the decoder
        runs (decoder forward pre-/post-hooks switch them on and off), and with
        ``config.offload_num_layers`` only those of the stage's first layers (the layers'
        pre-hooks say which one runs)."""
        if not (self.config.offload_layer_inputs and self.training and torch.is_grad_enabled()):
            return None
        if getattr(self, "_offloader", None) is None:
            self._offloader = LayerInputOffloader(self.offload_min_bytes, self.config.offload_num_layers)
            state = {}

            def pre_hook(module, args):
                state["ctx"] = self._offloader.active()
                state["ctx"].__enter__()

            def post_hook(module, args, output):
                state.pop("ctx").__exit__(None, None, None)
                self._offloader.finish_forward()

            self.decoder.register_forward_pre_hook(pre_hook)
            self.decoder.register_forward_hook(post_hook)
            for index, layer in enumerate(self.decoder.layers):  # this stage's layers, first to last
                layer.register_forward_pre_hook(lambda module, args, index=index: self._offloader.enter_layer(index))
        self._offloader._active = False  # a forward that raised cannot leave it on
        return self._offloader

    def _preprocess(self, *args, **kwargs):
        """megatron-core's embedding; with layer-input offloading the decoder's input goes to it
        wrapped (megatron-core's ``WrappedTensor``, which the decoder unwraps) so that
        ``GPTModel.forward`` holds no reference to it: the first layer's input then lives on the
        host only, instead of staying on the device until the loss is done (h x 2 bytes a token:
        4 GiB of TNL-1B at 1M tokens)."""
        out = super()._preprocess(*args, **kwargs)
        if (self._layer_input_offloader() is not None and isinstance(out[0], torch.Tensor)
                and self.config.mtp_num_layers is None):  # multi-token prediction reads it after the decoder
            out = (WrappedTensor(out[0]),) + tuple(out[1:])
        return out

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        """megatron-core's output layer + loss, or the fused chunked loss (``loss.py``) when
        ``config.fused_linear_cross_entropy`` and labels are given (training and validation)."""
        fused = (
            self.config.fused_linear_cross_entropy
            and self.post_process
            and labels is not None
            and kwargs.get("inference_context") is None
            and not kwargs.get("mtp_in_postprocess")
            and self.config.mtp_num_layers is None
        )
        if not fused:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        if self.share_embeddings_and_output_weights:
            weight = self.shared_embedding_or_output_weight()
        else:
            weight = self.output_layer.weight
        return linear_cross_entropy(
            hidden_states,
            weight,
            labels,
            tp_group=self.pg_collection.tp,
            sequence_parallel=self.output_layer.sequence_parallel,
            loss_weights=kwargs.get("loss_mask"),
            chunk_size=self.config.cross_entropy_chunk_size,
            kernel=self.config.cross_entropy_kernel,
        )

    def setup_embeddings_and_output_layer(self) -> None:
        """megatron-core's setup (tied-weight copies across pipeline stages), CPU-safe."""
        with platform.tensor_cuda_passthrough():
            super().setup_embeddings_and_output_layer()


def build_linear_lm(
    config: LinearLMConfig,
    vocab_size: int,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    pg_collection=None,
    vp_stage: Optional[int] = None,
) -> LinearLM:
    """Build the linear LM (or this pipeline stage of it) on megatron-core.

    Args:
        config: the model config (parallel sizes must match megatron-core's parallel state).
        vocab_size: vocabulary size (padded to a multiple of the TP size by the caller).
        pre_process: build the embedding (first pipeline stage).
        post_process: build the final norm and output layer and compute the loss (last stage).
        pg_collection: megatron-core ``ProcessGroupCollection`` (default: its global groups).
        vp_stage: virtual pipeline stage, or None.

    Returns:
        The :class:`LinearLM`, parameters on the current device (CPU without CUDA).

    Raises:
        ValueError: a vocabulary size not divisible by the TP size, or TE requested but missing.
    """
    tp = config.tensor_model_parallel_size
    if vocab_size < 1 or vocab_size % tp != 0:
        raise ValueError(
            f"vocab size {vocab_size} must be positive and divisible by --tensor-model-parallel-size ({tp}); "
            f"pad it (--make-vocab-size-divisible-by)"
        )
    pp_rank = None
    if pg_collection is not None and getattr(pg_collection, "pp", None) is not None:
        pp_rank = pg_collection.pp.rank()
    spec = get_linear_lm_block_spec(config, vp_stage=vp_stage, pp_rank=pp_rank)
    model = LinearLM(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=0,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=config.share_embeddings_and_output_weights,
        position_embedding_type="none",
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )
    logger.debug("built LinearLM stage with %d layers", len(model.decoder.layers))
    return model
