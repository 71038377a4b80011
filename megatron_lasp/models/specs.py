"""megatron-core layer / block specs of the linear LM.

``transformer_impl='local'`` (default, CPU and GPU):
    input_layernorm / pre_mlp_layernorm / final norm: :class:`~megatron_lasp.models.norms.RMSNorm`
    (TP-sequence-parallel aware); self_attention: :class:`LinearSelfAttention` with
    ``ColumnParallelLinear`` / ``RowParallelLinear``; mlp: megatron-core's ``MLP`` (GLU) with the
    local backend's linears.

With ``linear_attention_type='gated_delta_net'`` the linear layers' self_attention is
:class:`~megatron_lasp.models.delta_net.GatedDeltaNet` (``in_proj`` / ``out_proj`` the local
backend's column- / row-parallel linears; local implementation only).

``transformer_impl='transformer_engine'`` (GPU, Transformer Engine importable):
    the pre-norms are fused into the next linear, as in megatron-core's TE GPT spec:
    ``linear_qkv`` = ``TELayerNormColumnParallelLinear`` (input_layernorm = ``IdentityOp``), MLP
    ``linear_fc1`` = ``TELayerNormColumnParallelLinear`` (pre_mlp_layernorm = ``IdentityOp``),
    ``linear_proj`` / ``linear_fc2`` = ``TERowParallelLinear``, final norm = ``TENorm``. The
    attention-output ``GroupRMSNorm`` stays local (a per-head norm has no TE module).

The specs name the classes that run: the layer is :class:`~megatron_lasp.models.chunked.LinearTransformerLayer`
(megatron-core's ``TransformerLayer`` plus the optional chunked recompute), the MLP
:class:`~megatron_lasp.models.mlp.LinearLMMLP` (megatron-core's ``MLP`` with the fused GLU). The MLP
spec comes from megatron-core's ``get_mlp_module_spec_for_backend``, in the form the installed
version's ``TransformerLayer`` expects (a ``ModuleSpec`` in 0.16, a builder in 0.19), with its
class replaced by ours (:func:`glu_mlp_spec`). Both subclasses keep megatron-core's parameter
names, so checkpoints do not depend on them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules, get_transformer_layer_offset

from megatron_lasp.models.attention import LinearAttentionSubmodules, LinearSelfAttention
from megatron_lasp.models.chunked import LinearTransformerLayer
from megatron_lasp.models.config import LINEAR_LAYER, SOFTMAX_LAYER, LinearLMConfig
from megatron_lasp.models.delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
from megatron_lasp.models.gate import GateSubmodules, LinearAttentionGate
from megatron_lasp.models.mlp import LinearLMMLP
from megatron_lasp.models.norms import RMSNorm
from megatron_lasp.models.softmax_attention import SoftmaxCoreAttention, SoftmaxSelfAttention

__all__ = [
    "get_linear_lm_layer_spec",
    "get_softmax_layer_spec",
    "get_linear_lm_block_spec",
    "get_backend_provider",
    "glu_mlp_spec",
    "hybrid_model_arguments",
]


def get_backend_provider(config: LinearLMConfig):
    """megatron-core's ``BackendSpecProvider`` for ``config.transformer_impl``.

    (Whether Transformer Engine is installed is checked when the config is built.)
    """
    if config.transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return LocalSpecProvider()


def glu_mlp_spec(backend):
    """megatron-core's dense MLP spec for ``backend`` with :class:`LinearLMMLP` as its class.

    0.16 gives ``ModuleSpec(module=MLP, ...)``; 0.19 gives ``partial(MLP.as_mlp_submodule, ...)``
    (a classmethod, so the same partial bound to our subclass builds it).
    """
    spec = get_mlp_module_spec_for_backend(backend)
    if isinstance(spec, ModuleSpec) and spec.module is MLP:
        return dataclasses.replace(spec, module=LinearLMMLP)
    if isinstance(spec, functools.partial) and getattr(spec.func, "__self__", None) is MLP:
        method = getattr(LinearLMMLP, spec.func.__name__)
        return functools.partial(method, *spec.args, **spec.keywords)
    raise TypeError(f"unexpected MLP spec from megatron-core's get_mlp_module_spec_for_backend: {spec!r}")


def _layer_spec(attention: ModuleSpec, backend, te: bool) -> ModuleSpec:
    """A :class:`LinearTransformerLayer` around ``attention``: the pre-norms (fused into the next
    linear with Transformer Engine), the GLU MLP and megatron-core's bias-dropout-add."""
    return ModuleSpec(
        module=LinearTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if te else RMSNorm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp if te else RMSNorm,
            mlp=glu_mlp_spec(backend),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_linear_lm_layer_spec(config: LinearLMConfig) -> ModuleSpec:
    """The :class:`LinearTransformerLayer` spec of one linear-attention layer (same for every layer):
    lightning attention (:class:`LinearSelfAttention`) or, with ``linear_attention_type
    'gated_delta_net'``, :class:`~megatron_lasp.models.delta_net.GatedDeltaNet`."""
    backend = get_backend_provider(config)
    te = config.transformer_impl == "transformer_engine"
    if config.delta_net:  # transformer_impl local (the config's rule)
        attention = ModuleSpec(
            module=GatedDeltaNet,
            submodules=GatedDeltaNetSubmodules(
                in_proj=backend.column_parallel_linear(), out_proj=backend.row_parallel_linear()
            ),
        )
        return _layer_spec(attention, backend, te)
    attention = ModuleSpec(
        module=LinearSelfAttention,
        submodules=LinearAttentionSubmodules(
            linear_qkv=backend.column_parallel_layer_norm_linear() if te else backend.column_parallel_linear(),
            linear_proj=backend.row_parallel_linear(),
            gate=ModuleSpec(
                module=LinearAttentionGate, submodules=GateSubmodules(linear=backend.column_parallel_linear())
            ) if config.gated else None,
        ),
    )
    return _layer_spec(attention, backend, te)


def get_softmax_layer_spec(config: LinearLMConfig) -> ModuleSpec:
    """The :class:`LinearTransformerLayer` spec of one softmax-attention layer of a hybrid (a ``'*'``).

    megatron-core's ``SelfAttention`` (as :class:`SoftmaxSelfAttention`: RoPE at this rank's
    contiguous positions) with its fused QKV linear and output linear from the same backend as the
    linear layers, our :class:`SoftmaxCoreAttention` (sequence-parallel softmax attention), and the
    same norms, MLP and layer class as a linear layer (its chunked recompute chunks only the MLP
    half of a softmax layer: there is no attention state to carry).
    """
    backend = get_backend_provider(config)
    te = config.transformer_impl == "transformer_engine"
    attention = ModuleSpec(
        module=SoftmaxSelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_layer_norm_linear() if te else backend.column_parallel_linear(),
            core_attention=SoftmaxCoreAttention,
            linear_proj=backend.row_parallel_linear(),
        ),
    )
    return _layer_spec(attention, backend, te)


def final_norm_class(config: LinearLMConfig) -> type:
    """The final norm: ``TENorm`` with Transformer Engine, the SP-aware ``RMSNorm`` otherwise."""
    if config.transformer_impl == "transformer_engine":
        return get_backend_provider(config).layer_norm(rms_norm=True, for_qk=False)
    return RMSNorm


def get_linear_lm_block_spec(
    config: LinearLMConfig, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None
) -> TransformerBlockSubmodules:
    """The decoder block spec of THIS pipeline stage: its layers and the final norm.

    Each layer is a linear-attention or (hybrids) a softmax-attention layer, as
    ``config.layer_kinds`` says at its global index.

    Args:
        config: the model config.
        vp_stage: virtual pipeline stage (interleaved schedule), or None.
        pp_rank: pipeline rank (default: megatron-core's current one).

    Layers get their global ``layer_number`` from megatron-core (stage offset included), so the
    decay slopes of a layer do not depend on the pipeline split.
    """
    specs = {LINEAR_LAYER: get_linear_lm_layer_spec(config)}
    if config.is_hybrid:
        specs[SOFTMAX_LAYER] = get_softmax_layer_spec(config)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    kinds = config.layer_kinds[offset:offset + num_layers]
    return TransformerBlockSubmodules(layer_specs=[specs[kind] for kind in kinds], layer_norm=final_norm_class(config))


HYBRID_MODEL_SYMBOLS = {LINEAR_LAYER: "G", SOFTMAX_LAYER: "*"}
"""Our layer kinds as megatron-core's ``HybridStack`` symbols: a linear-attention layer fills the
slot of its own linear-attention family (Gated DeltaNet's ``G``), a softmax layer the attention
slot ``*``. Each of our layers carries its MLP, so no ``-`` layers appear."""


def hybrid_model_arguments(config: LinearLMConfig) -> dict:
    """The arguments that put this model's layers into megatron-core's ``HybridModel`` (>= 0.19).

    Returns ``{"hybrid_stack_spec": ModuleSpec(HybridStack, HybridStackSubmodules(...)),
    "hybrid_layer_pattern": str}``: the same layer specs as :func:`get_linear_lm_block_spec`, keyed by
    megatron-core's symbols. What else the move takes is written in ``models/README.md``.

    Raises:
        ImportError: the installed megatron-core has no ``HybridModel`` (0.16, 0.17).
    """
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules

    specs = {LINEAR_LAYER: get_linear_lm_layer_spec(config), SOFTMAX_LAYER: get_softmax_layer_spec(config)}
    submodules = HybridStackSubmodules(gdn_layer=specs[LINEAR_LAYER], attention_layer=specs[SOFTMAX_LAYER])
    pattern = "".join(HYBRID_MODEL_SYMBOLS[kind] for kind in config.layer_kinds)
    return {"hybrid_stack_spec": ModuleSpec(module=HybridStack, submodules=submodules), "hybrid_layer_pattern": pattern}

