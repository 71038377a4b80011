"""The TransNormerLLM-style linear-attention LM on megatron-core specs.

Builder API (what the training loop calls)::

    from megatron_lasp.parallel import initialize_parallel
    from megatron_lasp.models import linear_lm_config, build_linear_lm

    groups = initialize_parallel(tp, sp, pp, seed=1234)
    config = linear_lm_config("tnl-1b", tensor_model_parallel_size=tp, context_parallel_size=sp,
                              pipeline_model_parallel_size=pp, sequence_parallel=tp > 1,
                              sequence_parallel_mode="lasp", bf16=True, params_dtype=torch.bfloat16)
    model = build_linear_lm(config, vocab_size, pre_process=is_first_pp_stage,
                            post_process=is_last_pp_stage, pg_collection=groups, vp_stage=None)
    loss = model(input_ids, labels=labels)     # [b, s_local] each -> per-token loss [b, s_local]

- ``input_ids`` / ``labels``: this SP rank's CONTIGUOUS slice ``[b, s_local]`` of the sequence
  (``megatron_lasp.parallel.split_sequence``; never megatron-core's zig-zag
  ``get_batch_on_this_cp_rank``). ``s_local = seq_length / sp`` must be divisible by the TP size
  when ``sequence_parallel=True``.
- The loss of the full sequence is ``sum(per-token loss * loss_mask)`` over all SP ranks divided by
  the number of tokens of the full sequence: each SP rank divides its local sum by the GLOBAL
  token count; parameter gradients are then all-reduced (summed) over ``groups.dp_cp``.
- With TP sequence parallelism (``sequence_parallel=True``), the gradients of parameters marked
  ``param.sequence_parallel = True`` (the RMSNorm weights) are partial per TP rank and must be
  all-reduced over ``groups.tp`` (megatron-core's ``finalize_model_grads`` does it on GPU).
- Without labels the model returns logits ``[b, s_local, vocab / tp]`` (vocab-parallel).
- Pipeline parallelism: each stage builds only its layers (``pre_process`` / ``post_process``),
  later stages get their input through ``model.set_input_tensor``; decay slopes use the global
  layer number. Tied embeddings with PP > 1: the last stage holds a copy of the embedding
  (``output_layer.weight``), synchronised at build time; its gradient and the first stage's must be
  all-reduced over megatron-core's embedding group (``finalize_model_grads`` does it).
- ``pg_collection``: megatron-core's ``ProcessGroupCollection`` (default: its global groups; pass
  the one ``initialize_parallel`` returned); the LASP group is its ``cp`` group.
- Activation recompute: ``recompute_granularity='full'`` (+ ``recompute_method``,
  ``recompute_num_layers``) recomputes whole layers; ``'selective'`` with ``'core_attn'`` in
  ``recompute_modules`` (megatron-core's default) recomputes the linear-attention core (feature
  maps + kernel + SP communication); ``recompute_elementwise=True`` (with 'selective'; flag
  ``--recompute-modules elementwise``) frees the norm, norm x gate and GLU outputs that the next
  matmul saves and recomputes them before its backward (no matmul recomputed; exact).
- Long sequences (``loss.py``, ``offload.py``, ``chunked.py``, ``docs/MEMORY.md``): the output
  layer and loss run chunked over tokens by default (``fused_linear_cross_entropy``; pass ``loss_mask=`` to
  get the gradients computed in forward), ``offload_layer_inputs`` keeps the recompute checkpoints
  in pinned host memory (``offload_num_layers``: those of each stage's first layers only),
  ``recompute_chunk_size`` runs each layer in chunks of tokens under its own recompute.
- ``fusion``: the elementwise work around the matmuls runs in the Triton kernels of
  ``megatron_lasp.ops.fused`` (default on GPU; ``fusion=False`` / ``--no-fusion``: plain PyTorch,
  the CPU path).
- ``linear_attention_type='gated_delta_net'``: the linear layers are Gated DeltaNet
  (``delta_net.py``: short convolution, L2-normed q / k, the gated delta rule through
  ``megatron_lasp.parallel.delta_sp``; sizes ``linear_num_key_heads`` ...; presets ``gdn-1b``,
  ``gdn-1b-hybrid-1to3``) instead of lightning attention.
- ``transformer_impl='transformer_engine'`` uses megatron-core's TE modules (GPU, TE installed);
  ``'local'`` (default) runs everywhere.

Parameter names and the fused QKV layout for checkpoint converters: ``README.md`` in this folder.
"""

from megatron_lasp.models.attention import LinearSelfAttention, alibi_slopes, layer_slopes
from megatron_lasp.models.config import (
    PRESETS,
    LinearLMConfig,
    linear_lm_config,
    preset_vocab_size,
)
from megatron_lasp.models.delta_net import GatedDeltaNet
from megatron_lasp.models.model import LinearLM, build_linear_lm
from megatron_lasp.models.specs import get_linear_lm_block_spec, get_linear_lm_layer_spec

__all__ = [
    "PRESETS",
    "GatedDeltaNet",
    "LinearLM",
    "LinearLMConfig",
    "LinearSelfAttention",
    "alibi_slopes",
    "build_linear_lm",
    "get_linear_lm_block_spec",
    "get_linear_lm_layer_spec",
    "layer_slopes",
    "linear_lm_config",
    "preset_vocab_size",
]
