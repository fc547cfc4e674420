"""SPARO slot read-out (Vani et al., ECCV 2024), as specified in ../shared/SPARO.md.

Input: the token sequence h of shape (B, N, d) after the backbone's final LayerNorm.
For each slot l = 1..L, with attention width a and slot width V:

    k_l(h_n)  = W_l h_n + b_l                         per-slot key map, R^d -> R^a
    v_l(h_n)  = k_l(h_n)            (share_kv)         or its own map W'_l h_n + b'_l
    alpha_l,n = softmax_n( q_l . k_l(h_n) / sqrt(a) )  q_l: a learned query, no input dependence
    z_l       = sum_n alpha_l,n v_l(h_n)                                      in R^a
    y_l       = W_o z_l + b_o                          W_o shared by every slot, in R^V

Normalisation "slot" (SPARO.md's cont:const): e_l = y_l / ||y_l|| / sqrt(L), and the encoding is
the concatenation [e_1, ..., e_L], a unit vector whose dot products are the mean per-slot cosine.
Normalisation "global": the concatenation [y_1, ..., y_L] / ||[y_1, ..., y_L]||.

How it is computed. Evaluating k_l(h_n) for every token and slot costs N * d * L * a
multiply-adds per image, about one ViT-S block. Two identities make it much cheaper while
computing the same function:

  1. q_l . k_l(h_n) = (W_l^T q_l) . h_n + q_l . b_l. The second term does not depend on n, and
     a softmax over n is blind to a constant shift, so the logits are h_n . u_l with the
     "effective query" u_l = W_l^T q_l / sqrt(a): one (N x d) @ (d x L) product.
  2. The attention weights sum to 1 over n, so z_l = sum_n alpha_l,n (W_l h_n + b_l)
     = W_l (sum_n alpha_l,n h_n) + b_l: pool the tokens first, then apply each slot's map once.

The cost drops to about 3 * L * N * d per image (ViT-S, 197 tokens: ~30x fewer operations) and
no (B, N, L, a) tensor is ever materialised. tests/test_sparo_head.py checks the result
against a literal per-slot evaluation of the equations above.
"""
from __future__ import annotations

import math
from typing import Literal, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

SlotNorm = Literal["slot", "global"]
SLOT_NORMS = ("slot", "global")


class SparoReadout(nn.Module):
    """L single-head attention slots with learned queries, normalised per slot and concatenated.

    Args:
        embed_dim: token width d of the backbone.
        num_slots: L, the number of slots.
        slot_dim: V, the width of each slot's output.
        attn_dim: a, the width of each slot's queries, keys and values (ViT: d / num_heads).
        share_kv: use a slot's keys as its values (SPARO's default) instead of a separate map.
        norm: "slot" (per-slot L2 normalisation times 1/sqrt(L)) or "global" (L2 of the whole).
    """

    def __init__(self, embed_dim: int, num_slots: int = 64, slot_dim: int = 64,
                 attn_dim: int = 64, share_kv: bool = True, norm: SlotNorm = "slot") -> None:
        super().__init__()
        if min(embed_dim, num_slots, slot_dim, attn_dim) < 1:
            raise ValueError(f"SPARO sizes must be positive, got d={embed_dim}, L={num_slots}, "
                             f"V={slot_dim}, a={attn_dim}")
        if norm not in SLOT_NORMS:
            raise ValueError(f"SPARO norm must be one of {SLOT_NORMS}, got {norm!r}")
        self.embed_dim, self.num_slots, self.slot_dim, self.attn_dim = (
            embed_dim, num_slots, slot_dim, attn_dim)
        self.share_kv, self.norm = share_kv, norm

        self.queries = nn.Parameter(torch.empty(num_slots, attn_dim))          # q_l
        # With separate values the key biases b_l would only add q_l . b_l, a constant over
        # tokens, to each slot's logits: the softmax cancels it, so the read-out does not
        # depend on b_l at all (zero gradient, which DDP refuses). They are left out.
        self.key = nn.Linear(embed_dim, num_slots * attn_dim, bias=share_kv)  # all W_l (, b_l)
        self.value = None if share_kv else nn.Linear(embed_dim, num_slots * attn_dim)
        self.out_proj = nn.Linear(attn_dim, slot_dim)                         # W_o, b_o
        self.reset_parameters()

    @property
    def out_dim(self) -> int:
        """Width of the encoding, L * V."""
        return self.num_slots * self.slot_dim

    def reset_parameters(self) -> None:
        """SPARO.md's initialisation: standard-normal queries, Xavier-uniform key and value
        maps, W_o with nn.Linear's default initialisation (as in the authors' code), zero biases."""
        nn.init.normal_(self.queries)
        for linear in (self.key, self.value):
            if linear is not None:
                nn.init.xavier_uniform_(linear.weight)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
        self.out_proj.reset_parameters()
        nn.init.zeros_(self.out_proj.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # Checkpoints written before the key biases were left out (share_kv false) still carry
        # them; the read-out never depended on their values, so they are dropped.
        if self.key.bias is None:
            state_dict.pop(prefix + "key.bias", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---------------------------------------------------------------- the equations, factorised
    def slot_maps(self, linear: nn.Linear) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A Linear(d, L*a) seen as L maps: weights (L, a, d) and biases (L, a) or None."""
        L, a = self.num_slots, self.attn_dim
        bias = None if linear.bias is None else linear.bias.view(L, a)
        return linear.weight.view(L, a, self.embed_dim), bias

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        """alpha, shape (B, L, N): each slot's softmax over the N tokens."""
        key_weight, _ = self.slot_maps(self.key)
        # u_l = W_l^T q_l / sqrt(a); the q_l . b_l term is constant over tokens and cancels.
        effective_queries = torch.einsum("la,lad->ld", self.queries, key_weight)
        logits = torch.matmul(h, effective_queries.t().to(h.dtype)) / math.sqrt(self.attn_dim)
        return logits.float().softmax(dim=1).transpose(1, 2)

    def slot_contents(self, h: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """z, shape (B, L, a): z_l = W_l (sum_n alpha_l,n h_n) + b_l, for the value map."""
        pooled_tokens = torch.bmm(alpha.to(h.dtype), h)                  # (B, L, d)
        value_weight, value_bias = self.slot_maps(self.key if self.share_kv else self.value)
        # One (B x d) @ (d x a) product per slot, batched over slots.
        z = torch.bmm(pooled_tokens.transpose(0, 1), value_weight.transpose(1, 2).to(h.dtype))
        return z.transpose(0, 1) + value_bias.to(z.dtype)

    def normalise(self, y: torch.Tensor) -> torch.Tensor:
        """(B, L, V) slot outputs -> (B, L*V) unit-norm encoding."""
        y = y.float()  # norms in fp32 under autocast: a bf16 norm of 64 squares is coarse
        if self.norm == "slot":
            return (F.normalize(y, dim=-1) / math.sqrt(self.num_slots)).flatten(1)
        return F.normalize(y.flatten(1), dim=-1)

    def forward(self, h: torch.Tensor, return_attention: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Encode tokens h (B, N, d) into (B, L*V); also return alpha (B, L, N) on request."""
        if h.dim() != 3 or h.shape[-1] != self.embed_dim:
            raise ValueError(f"SPARO expects tokens of shape (B, N, {self.embed_dim}), "
                             f"got {tuple(h.shape)}")
        alpha = self.attention(h)
        y = self.out_proj(self.slot_contents(h, alpha))
        encoding = self.normalise(y)
        return (encoding, alpha) if return_attention else encoding

    def extra_repr(self) -> str:
        return (f"slots={self.num_slots}, slot_dim={self.slot_dim}, attn_dim={self.attn_dim}, "
                f"share_kv={self.share_kv}, norm={self.norm}")


def select_slots(encoding: torch.Tensor, num_slots: int,
                 slots: Optional[torch.Tensor | list[int]] = None) -> torch.Tensor:
    """Keep a subset S of the L slots of a slot-normalised encoding (B, L*V).

    The kept slots are rescaled by sqrt(L / |S|) so that the result keeps unit norm and its dot
    products stay the mean per-slot cosine over S (SPARO.md, "Concept selection").
    """
    if slots is None:
        return encoding
    index = torch.as_tensor(slots, dtype=torch.long, device=encoding.device)
    if index.numel() == 0:
        raise ValueError("select_slots needs at least one slot")
    if int(index.min()) < 0 or int(index.max()) >= num_slots:
        raise ValueError(f"slot indices must lie in [0, {num_slots - 1}], got {index.tolist()}")
    per_slot = encoding.view(encoding.shape[0], num_slots, -1)
    return per_slot[:, index].flatten(1) * math.sqrt(num_slots / index.numel())
