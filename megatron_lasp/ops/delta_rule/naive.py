"""Plain PyTorch reference for the gated delta rule (the ground truth of every test).

Per batch row ``b`` and head ``h``, with the state ``S`` of shape ``[Dk, Dv]``::

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,     o_t = S_t^T (scale q_t)

computed token by token in the "prediction error" form (README.md, "The recurrence"). It runs in
fp32 (fp64 when the inputs are fp64), is differentiable through plain autograd (every input,
``g``, ``beta`` and ``initial_state`` included) and is written for clarity, not speed.

Packed documents (``cu_seqlens``, see ``lightning_attn/documents.py``): the state is zeroed before
the first token of every document except a row's first; the initial state feeds only the first
document of each row and the final state is the one after the row's last document.
"""

from typing import Optional, Tuple

import torch

from megatron_lasp.ops.lightning_attn.documents import check_cu_seqlens, doc_ids_from_cu_seqlens

__all__ = ["naive_recurrent_gated_delta_rule"]


def naive_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Token-by-token gated delta rule.

    Args:
        q, k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``.
        g: ``[B, T, H]`` log-decays (``<= 0``); beta: ``[B, T, H]`` write strengths.
        scale: the factor of ``q``; None means ``Dk ** -0.5``.
        initial_state: ``[B, H, Dk, Dv]`` or None (zeros).
        output_final_state: also return the state after the last token.
        cu_seqlens: document starts ``[N + 1]`` over the ``B * T`` tokens, or None (one document
            per row); the state restarts at each document start.

    Returns:
        ``(o [B, T, H, Dv] in q's dtype, final state [B, H, Dk, Dv] fp32/fp64 or None)``.
    """
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    scale = Dk ** -0.5 if scale is None else scale
    qf, kf, vf = q.to(cdt) * scale, k.to(cdt), v.to(cdt)
    decay, bf = torch.exp(g.to(cdt)), beta.to(cdt)  # [B, T, H]
    state = q.new_zeros(B, H, Dk, Dv, dtype=cdt) if initial_state is None else initial_state.to(cdt)
    docs = None
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B * T, q.device, values=True, where="naive gated delta rule")
        docs = doc_ids_from_cu_seqlens(cu_seqlens, B, T, q.device)
    outs = []
    for t in range(T):
        if docs is not None and t > 0:
            state = state * (docs[:, t] == docs[:, t - 1]).to(cdt).view(B, 1, 1, 1)
        state = decay[:, t, :, None, None] * state
        kt = kf[:, t]  # [B, H, Dk]
        u = bf[:, t, :, None] * (vf[:, t] - torch.einsum("bhk,bhkv->bhv", kt, state))  # [B, H, Dv]
        state = state + kt[..., :, None] * u[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", qf[:, t], state))
    o = torch.stack(outs, dim=1).to(q.dtype)
    return o, (state if output_final_state else None)
