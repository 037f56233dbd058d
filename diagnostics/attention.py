"""``nn.MultiheadAttention`` as four linear layers ``<name>.q``, ``<name>.k``, ``<name>.v``, ``<name>.out_proj``.

``F.multi_head_attention_forward`` uses ``in_proj_weight`` (or ``q_proj_weight``, ``k_proj_weight``,
``v_proj_weight`` when ``kdim``/``vdim`` differ from ``embed_dim``) and ``out_proj.weight`` directly: no
submodule call exposes the projections, and ``out_proj`` is never called. While the engine records,
the module's forward is :func:`attention_forward`, PyTorch's computation written out step by step
(same operations in the same order, so the outputs are bitwise the same), which hands the four
pre-activations to the recorder:

- ``q = x_q W_q^T + b_q``, ``k = x_k W_k^T + b_k``, ``v = x_v W_v^T + b_v``, with ``W_q, W_k, W_v`` the
  row blocks of ``in_proj_weight`` (or the separate weights), ``x_q, x_k, x_v`` = query, key, value;
- ``o = a W_o^T + b_o`` with ``a`` the concatenated attention heads.

Every token is a row; the recorded tensors are batch-major ``(B, L, E)`` whatever ``batch_first``
(so a ``(batch, tokens)`` sample mask applies to them). The appended ``bias_k``/``bias_v`` and ``add_zero_attn`` positions are not projections and
give no rows. PyTorch's fused fast paths (``torch.backends.mha``) are off while recording, so nested
tensors and fused encoder layers do not bypass the explicit computation; the model is unchanged
outside ``measure()``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .common import check_choice
from .layers import LayerAdapter, Recorder, register_adapter

__all__ = ["AttentionProjectionAdapter", "attention_forward", "ROLES"]

#: The layers of one ``nn.MultiheadAttention``, named ``<module name>.<role>``.
ROLES = ("q", "k", "v", "out_proj")


def _stock_attention(module: nn.Module) -> bool:
    """An ``nn.MultiheadAttention`` whose forward is PyTorch's (a subclass that overrides it computes
    something else, so its projections cannot be read this way)."""
    return (
        isinstance(module, nn.MultiheadAttention)
        and type(module).forward is nn.MultiheadAttention.forward
        and "forward" not in vars(module)
    )


class AttentionProjectionAdapter(LayerAdapter):
    """One projection (``role`` in :data:`ROLES`) of an ``nn.MultiheadAttention``: ``W`` is the role's
    row block of ``in_proj_weight`` (``(E, E)``), ``q_proj_weight`` / ``k_proj_weight`` (``(E, kdim)``) /
    ``v_proj_weight`` (``(E, vdim)``), or ``out_proj.weight``."""

    def __init__(self, module_name: str, module: nn.MultiheadAttention, role: str) -> None:
        check_choice("attention projection", role, ROLES)
        super().__init__(f"{module_name}.{role}" if module_name else role, module, module_name)
        self.role = role

    def weight_matrix(self) -> Tensor:
        m = self.module
        if self.role == "out_proj":
            return m.out_proj.weight
        if m._qkv_same_embed_dim:
            i, E = "qkv".index(self.role), m.embed_dim
            return m.in_proj_weight[i * E : (i + 1) * E]
        return getattr(m, f"{self.role}_proj_weight")

    @classmethod
    def attach(cls, adapters: Sequence[LayerAdapter], recorder: Recorder) -> list[RemovableHandle]:
        """A pre-hook (error messages; its presence also keeps ``nn.TransformerEncoderLayer`` off its
        fused path) and, while recording, :func:`attention_forward` as the module's forward."""
        module = adapters[0].module
        names = {a.role: a.name for a in adapters}
        first = adapters[0].name

        def pre(mod: nn.Module, args: tuple) -> None:
            if recorder.is_recording:
                recorder.enter(first)

        return [
            module.register_forward_pre_hook(pre),
            recorder.while_recording(lambda: _explicit_forward(module, names, recorder)),
        ]


@register_adapter(_stock_attention)
def _attention(name: str, module: nn.Module) -> list[LayerAdapter]:
    return [AttentionProjectionAdapter(name, module, role) for role in ROLES]


@contextmanager
def _explicit_forward(module: nn.MultiheadAttention, names: dict[str, str], recorder: Recorder) -> Iterator[None]:
    """``module.forward`` is :func:`attention_forward` and the MHA fast paths are off for the block."""
    if "forward" in vars(module):
        raise RuntimeError(
            f"{type(module).__name__} {names}: its forward was replaced on the instance, so its projections "
            "cannot be measured; measure it before patching it or exclude its layers with layers=[...]"
        )
    fastpath = torch.backends.mha.get_fastpath_enabled()
    module.forward = partial(attention_forward, module, names, recorder)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        del module.forward


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask as an additive float mask (``-inf`` where ``True``), as PyTorch does."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _split_packed(proj: Tensor, parts: int, E: int) -> Tensor:
    """``(..., parts*E) -> (parts, ..., E)``, contiguous, exactly as ``F._in_projection_packed``."""
    return proj.unflatten(-1, (parts, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()


def attention_forward(
    module: nn.MultiheadAttention,
    names: dict[str, str],
    recorder: Recorder,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``nn.MultiheadAttention.forward`` (PyTorch's non-fused path) with the projections ``q, k, v``
    and ``o`` (see the module docstring) passed through ``recorder.record`` for the roles in ``names``
    (``{role: layer name}``). Same arguments and outputs as the module's forward."""
    m = module
    if query.is_nested or key.is_nested or value.is_nested:
        raise ValueError(
            f"layers {list(names.values())}: nn.MultiheadAttention received a NestedTensor; pass padded "
            "tensors (with a key_padding_mask) to measure it"
        )
    batched = query.dim() == 3
    query, key, value, key_padding_mask = _sequence_first(m, query, key, value, key_padding_mask)
    L, B, E = query.shape
    key_padding_mask, attn_mask, is_causal = _masks(key_padding_mask, attn_mask, is_causal, need_weights, query.dtype)
    record = partial(_record, names, recorder)
    q, k, v = _in_projection(m, query, key, value)
    q, k, v = record("q", query, q), record("k", key, k), record("v", value, v)
    q, k, v, attn_mask = _heads(m, q, k, v, attn_mask, key_padding_mask)
    a, weights = _attend(q, k, v, attn_mask, m.dropout if m.training else 0.0, is_causal, need_weights, (L, B, E))
    if weights is not None and average_attn_weights:
        weights = weights.mean(dim=1)
    out = F.linear(a, m.out_proj.weight, m.out_proj.bias)
    out = record("out_proj", a.view(L, B, E), out.view(L, B, out.size(1)))
    if not batched:
        out = out.squeeze(1)
        weights = weights.squeeze(0) if weights is not None else None
    if m.batch_first and batched:
        out = out.transpose(1, 0)
    return out, weights


def _sequence_first(
    m: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Query, key and value as ``(L, B, E)`` and the padding mask as ``(B, S)``, keeping the ``is``
    relations between query, key and value, as ``nn.MultiheadAttention`` does."""
    if m.batch_first and query.dim() == 3:
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (x.transpose(1, 0) for x in (query, key))
                value = key
        else:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    if query.dim() == 2:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    return query, key, value, key_padding_mask


def _masks(
    key_padding_mask: Tensor | None, attn_mask: Tensor | None, is_causal: bool, need_weights: bool, dtype: torch.dtype
) -> tuple[Tensor | None, Tensor | None, bool]:
    """Both masks as additive float masks, and ``is_causal`` as ``F.multi_head_attention_forward`` uses it."""
    key_padding_mask = _float_mask(key_padding_mask, dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint (nn.MultiheadAttention)")
    if is_causal and key_padding_mask is None and not need_weights:
        return key_padding_mask, None, is_causal  # scaled_dot_product_attention applies the causal mask itself
    attn_mask = _float_mask(attn_mask, dtype)
    return key_padding_mask, attn_mask, is_causal and key_padding_mask is None


def _record(names: dict[str, str], recorder: Recorder, role: str, x: Tensor, h: Tensor) -> Tensor:
    """Record ``h`` as layer ``names[role]`` with input ``x``, both ``(L, B, *)``, batch-major."""
    name = names.get(role)
    if name is None or not recorder.is_recording:  # e.g. recomputed by checkpointing in a backward pass
        return h
    return recorder.record(name, h.transpose(0, 1), x.transpose(0, 1)).transpose(0, 1)


def _in_projection(
    m: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``q, k, v``: the same linear calls as ``F._in_projection_packed`` / ``F._in_projection``."""
    b, E = m.in_proj_bias, query.shape[-1]
    if not m._qkv_same_embed_dim:
        b_q, b_k, b_v = b.chunk(3) if b is not None else (None, None, None)
        q = F.linear(query, m.q_proj_weight, b_q)
        return q, F.linear(key, m.k_proj_weight, b_k), F.linear(value, m.v_proj_weight, b_v)
    W = m.in_proj_weight
    if key is value and query is key:
        q, k, v = _split_packed(F.linear(query, W, b), 3, E)
        return q, k, v
    if key is value:
        w_q, w_kv = W.split([E, E * 2])
        b_q, b_kv = b.split([E, E * 2]) if b is not None else (None, None)
        k, v = _split_packed(F.linear(key, w_kv, b_kv), 2, E)
        return F.linear(query, w_q, b_q), k, v
    w_q, w_k, w_v = W.chunk(3)
    b_q, b_k, b_v = b.chunk(3) if b is not None else (None, None, None)
    return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


def _heads(
    m: nn.MultiheadAttention, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``q, k, v`` split into heads ``(B·H, L or S, hd)`` with ``bias_k``/``bias_v`` and the zero
    attention position appended, and the padding mask merged into the ``(B·H, 1 or L, S)`` attention mask."""
    L, B, E = q.shape
    H = m.num_heads
    hd = E // H
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if m.bias_k is not None and m.bias_v is not None:
        k = torch.cat([k, m.bias_k.repeat(1, B, 1)])
        v = torch.cat([v, m.bias_v.repeat(1, B, 1)])
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
    q = q.view(L, B * H, hd).transpose(0, 1)
    k = k.view(k.shape[0], B * H, hd).transpose(0, 1)
    v = v.view(v.shape[0], B * H, hd).transpose(0, 1)
    if m.add_zero_attn:
        zeros = torch.zeros((B * H, 1, hd), dtype=k.dtype, device=k.device)
        k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
    S = k.size(1)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.view(B, 1, 1, S).expand(-1, H, -1, -1).reshape(B * H, 1, S)
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    return q, k, v, attn_mask


def _attend(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float, is_causal: bool, need_weights: bool,
    shape: tuple[int, int, int],
) -> tuple[Tensor, Tensor | None]:
    """The concatenated heads ``a = softmax(q k^T / sqrt(hd) + mask) v`` as ``(L·B, E)`` and, with
    ``need_weights``, the attention weights ``(B, H, L, S)`` (PyTorch's two paths, op for op)."""
    L, B, E = shape
    BH, S, hd = k.shape
    H = BH // B
    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(hd))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        a = torch.bmm(weights, v).transpose(0, 1).reshape(L * B, E)
        return a, weights.view(B, H, L, S)
    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(B, H, -1, S)
    a = F.scaled_dot_product_attention(
        q.view(B, H, L, hd), k.view(B, H, S, hd), v.view(B, H, S, hd), attn_mask, dropout_p, is_causal
    )
    return a.permute(2, 0, 1, 3).reshape(B * L, E), None
