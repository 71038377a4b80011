"""The softmax-attention layers of a hybrid model: megatron-core's ``SelfAttention`` on our slices.

A ``'*'`` of ``config.hybrid_layer_pattern`` is megatron-core's ``SelfAttention`` (fused QKV
projection in megatron-core's grouped layout, grouped-query attention with ``num_query_groups``
key/value heads, RoPE, output projection; TP through its parallel linears) with two pieces of ours:

- :class:`SoftmaxSelfAttention` gives RoPE the positions of **this rank's contiguous slice**
  (``[r C, (r+1) C)``). megatron-core's own rotary embedding would cut it for its zig-zag layout;
  here each softmax layer asks megatron-core's ``RotaryEmbedding`` for its positions directly, so
  the model keeps ``position_embedding_type='none'`` and the linear layers see no RoPE.
- :class:`SoftmaxCoreAttention` is the ``core_attention``: causal softmax attention over the
  sequence-parallel group (``megatron_lasp.parallel.softmax.softmax_attn_sp``: all-gather of K
  and V, or Ulysses), a library kernel underneath (``megatron_lasp.ops.softmax_attn``), packed
  documents from ``packed_seq_params.cu_seqlens_q`` (global offsets, the same as the linear layers).

Transformer Engine's ``DotProductAttention`` is not used for these layers: its context
parallelism expects megatron-core's zig-zag slices, which the linear layers cannot use, and it
reads ``cu_seqlens`` only in the ``thd`` layout; with ``transformer_impl='transformer_engine'`` the
projections are TE's (norm fused into the QKV linear) and the core attention is ours (flash /
cuDNN through torch's SDPA).

Positions are the global token positions of the row (documents do not restart them): RoPE is
relative, so within a document this is the same attention as positions counted from its start.

**Query chunks** (the whole-layer chunked recompute, :mod:`megatron_lasp.models.chunked`): inside
:meth:`SoftmaxSelfAttention.carrying_kv` the layer runs on one chunk of the sequence; RoPE takes the
chunk's positions and the core attention reads the chunk's queries against the keys and values of
every earlier token (:class:`KVCarry`, post-RoPE) followed by the chunk's own, which it hands back
in the carry. Each query's softmax is over the same keys as in the whole-sequence call, so the
output is the same attention.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_lasp.ops.softmax_attn import softmax_attn
from megatron_lasp.parallel.softmax import softmax_attn_sp

__all__ = ["KVCarry", "KVOnly", "SoftmaxCoreAttention", "SoftmaxSelfAttention"]


@dataclasses.dataclass
class KVCarry:
    """One query chunk of a softmax layer: what enters it and what it gives back.

    ``start``: the chunk's first position in the whole sequence (its RoPE offset; on a rank of a
    sequence-parallel group, after the slices before it). ``k_prev`` / ``v_prev``: ``[start, b, hkv,
    d]`` post-RoPE keys and values of the tokens before the chunk (None for the first). ``docs``:
    ``[b, T]`` document ids of the whole sequence, or None. The core attention fills ``query`` /
    ``key`` / ``value``: the chunk's own ``[s, b, h, d]`` (graph tensors when gradients are on).

    ``own_included``: ``k_prev`` / ``v_prev`` run to the chunk's end (they hold its own keys and
    values too, e.g. gathered from the sequence-parallel group): the attention reads them as they
    are. ``kv_only``: stop the layer once the chunk's queries, keys and values exist (the core
    attention raises :class:`KVOnly`: no attention, projection or MLP). ``cut``: the attention reads
    detached copies of the chunk's queries, keys and values (``query`` / ``key`` / ``value`` are
    then those leaves), so that a backward stops there."""

    start: int
    k_prev: Optional[torch.Tensor]
    v_prev: Optional[torch.Tensor]
    docs: Optional[torch.Tensor]
    own_included: bool = False
    kv_only: bool = False
    cut: bool = False
    query: Optional[torch.Tensor] = None
    key: Optional[torch.Tensor] = None
    value: Optional[torch.Tensor] = None


class KVOnly(Exception):
    """Raised by the core attention under ``KVCarry.kv_only`` once the carry holds the chunk's q, k, v."""


class SoftmaxCoreAttention(MegatronModule):
    """``core_attention`` of a softmax layer: causal attention over the sequence-parallel group.

    Built by megatron-core's ``Attention`` as ``(config, layer_number, attn_mask_type,
    attention_type, cp_comm_type, softmax_scale, pg_collection)``; called as
    ``forward(query [s, b, hq, d], key [s, b, hkv, d], value [s, b, hkv, d], attention_mask,
    attn_mask_type=, attention_bias=, packed_seq_params=) -> [s, b, hq * d]``. The mask argument is
    ignored (the attention is causal by construction; documents come from ``packed_seq_params``).
    """

    def __init__(self, config, layer_number: int, attn_mask_type=AttnMaskType.causal, attention_type: str = "self",
                 cp_comm_type: Optional[str] = None, softmax_scale: Optional[float] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None, **unused):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        if attention_type != "self" or attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError("SoftmaxCoreAttention: only causal self-attention is supported")
        self.layer_number = layer_number
        self.sp_group = pg_collection.cp
        self.softmax_scale = softmax_scale
        self._sp_checked = False  # the ranks' agreement is checked on the first call only
        self.carry: Optional[KVCarry] = None  # set by SoftmaxSelfAttention.carrying_kv

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **unused):
        if attention_bias is not None:
            raise ValueError("SoftmaxCoreAttention: attention_bias is not supported")
        cu_seqlens = None
        if packed_seq_params is not None:
            cu_seqlens = getattr(packed_seq_params, "cu_seqlens_q", None)
            if cu_seqlens is None:
                raise ValueError("SoftmaxCoreAttention: packed_seq_params needs cu_seqlens_q (the document starts)")
        s, b = query.shape[:2]
        if self.carry is not None:
            return self._chunk(query, key, value).transpose(0, 1).reshape(s, b, -1)
        o = softmax_attn_sp(
            query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), self.sp_group,
            self.config.softmax_sequence_parallel_mode, cu_seqlens=cu_seqlens, scale=self.softmax_scale,
            kernel=self.config.softmax_kernel, validate=None if not self._sp_checked else False,
        )
        self._sp_checked = True
        return o.transpose(0, 1).reshape(s, b, -1)

    def _chunk(self, query, key, value):
        """``[b, s, hq, d]``: the chunk's queries against the carried keys and its own (module docstring)."""
        carry = self.carry
        if carry.cut:
            query, key, value = (t.detach().requires_grad_(True) for t in (query, key, value))
        carry.query, carry.key, carry.value = query, key, value
        if carry.kv_only:
            raise KVOnly
        if carry.own_included:
            key, value = carry.k_prev, carry.v_prev
        elif carry.k_prev is not None:
            key, value = torch.cat([carry.k_prev, key]), torch.cat([carry.v_prev, value])
        stop = carry.start + query.shape[0]
        docs = carry.docs
        return softmax_attn(
            query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
            q_docs=None if docs is None else docs[:, carry.start:stop],
            k_docs=None if docs is None else docs[:, :stop],
            scale=self.softmax_scale, kernel=self.config.softmax_kernel,
        )


class SoftmaxSelfAttention(SelfAttention):
    """megatron-core's ``SelfAttention`` with RoPE at this rank's contiguous positions.

    Built by ``TransformerLayer`` like ``SelfAttention`` (the mask type is always causal); its
    ``forward`` takes the layer's arguments and replaces ``rotary_pos_emb`` with the embedding of
    positions ``[r C, (r+1) C)`` of sequence-parallel rank ``r`` (``C``: this rank's tokens, after
    the TP sequence-parallel gather).
    """

    def __init__(self, config, submodules, layer_number: int, attn_mask_type=AttnMaskType.causal,
                 cp_comm_type: Optional[str] = None, pg_collection: Optional[ProcessGroupCollection] = None,
                 **unused):
        super().__init__(config, submodules, layer_number, attn_mask_type=AttnMaskType.causal,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        self.sp_group = self.pg_collection.cp
        # megatron-core's RoPE tables, asked for explicit positions (get_emb), never for its CP cut;
        # kept out of the module tree (no parameters, nothing in the state dict)
        self.__dict__["_rotary"] = RotaryEmbedding(
            kv_channels=config.kv_channels, rotary_percent=1.0, rotary_interleaved=config.rotary_interleaved,
            rotary_base=config.rotary_base, use_cpu_initialization=True, cp_group=self.sp_group,
        )

    def rotary_embedding(self, local_tokens: int) -> torch.Tensor:
        """``[C, 1, 1, d]`` RoPE angles of this rank's positions ``[r C, (r+1) C)`` (of a query
        chunk's positions inside :meth:`carrying_kv`)."""
        carry = getattr(self.core_attention, "carry", None)
        offset = carry.start if carry is not None else self.sp_group.rank() * local_tokens
        return self._rotary.get_emb(local_tokens, offset=offset)

    @contextlib.contextmanager
    def carrying_kv(self, carry: KVCarry):
        """Run the layer on one query chunk (module docstring): the forward calls inside see
        ``carry``, whose ``query`` / ``key`` / ``value`` the core attention fills."""
        self.core_attention.carry = carry
        try:
            yield carry
        finally:
            self.core_attention.carry = None

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        """``[s, b, hidden] -> (out [s, b, hidden], bias)``, as ``SelfAttention.forward``."""
        if kwargs.get("inference_context") is not None:
            raise NotImplementedError(
                "SoftmaxSelfAttention: megatron-core's incremental inference is not wired for hybrid "
                "models; generate with the HF conversion"
            )
        tokens = hidden_states.shape[0]
        if self.config.sequence_parallel:
            tokens *= self.pg_collection.tp.size()
        kwargs["rotary_pos_emb"] = self.rotary_embedding(tokens)
        return super().forward(hidden_states, attention_mask, *args, **kwargs)
