"""Which modules are attention, and how to get their queries and keys back without touching their kernel.

An *adapter* takes an attention module and the arguments of one call (seen by a forward pre-hook
with ``with_kwargs=True``) and returns what :func:`lightning_health.readings.attention.attention_totals`
needs: queries and keys ``(B, H, L, D)`` after any rotary embedding, the score scale, the mask and
whether the call is causal. On sampled steps it recomputes q and k with the module's own
projections (under ``no_grad``): the model's forward, and its SDPA/flash kernel, run unchanged.

Recognised out of the box (by structure, so look-alikes such as RoBERTa's or Mistral's modules
are recognised too):

- ``torch.nn.MultiheadAttention`` (self- or cross-attention; ``attn_mask``, ``key_padding_mask``
  and ``is_causal`` respected; modules with ``bias_k``/``add_zero_attn`` are skipped);
- Hugging Face GPT-2 attention (fused ``c_attn`` Conv1D, ``split_size``; cross-attention calls skipped);
- Hugging Face BERT self-attention (``query``/``key`` Linear, ``attention_head_size``);
- Hugging Face Llama-style attention (``q_proj``/``k_proj``, ``head_dim``; the rotary embedding is
  applied with the ``apply_rotary_pos_emb`` of the module's own modeling file to the
  ``position_embeddings`` (cos, sin) it is called with; grouped-query keys are repeated per head).

Others are registered with ``HealthMonitor(attention={"name or regex": AttentionSpec(...)})``.
Residual blocks (whose outputs are the stream between blocks) are recognised by class name in
:data:`BLOCK_CLASSES`, which a user may extend.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

BLOCK_CLASSES: set[str] = {
    "GPT2Block",
    "BertLayer",
    "RobertaLayer",
    "LlamaDecoderLayer",
    "MistralDecoderLayer",
    "Qwen2DecoderLayer",
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
}
"""Class names of residual blocks whose first output tensor is read for massive activations."""


@dataclasses.dataclass(frozen=True)
class Scores:
    """What one attention call needs to have its scores rebuilt."""

    q: Tensor  # (B, H, L, D)
    k: Tensor  # (B, H, S, D)
    scaling: float
    mask: Tensor | None = None  # bool (True = may attend) or additive float, broadcastable to (B, H, L, S)
    causal: bool = False
    softcap: float | None = None  # scores capped as cap * tanh(s / cap) before the softmax (Gemma 2)


Adapter = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Scores | None]


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """How to rebuild the scores of an attention module the monitor does not know.

    The module's first argument (or ``hidden_states``) is its input; ``query`` and ``key`` name
    its submodules that project it to ``heads * head_dim`` (self-attention only).

    Args:
        query: name of the query projection submodule.
        key: name of the key projection submodule.
        heads: query heads.
        kv_heads: key heads (grouped-query attention); ``None``: as many as ``heads``.
        scaling: the score scale; ``None``: ``1/sqrt(head_dim)``.
        causal: the module attends causally.
        mask_kwarg: the keyword carrying the mask (bool True = may attend, or additive float), or ``None``.

    Example:
        >>> spec = AttentionSpec(query="wq", key="wk", heads=8, causal=True)
    """

    query: str
    key: str
    heads: int
    kv_heads: int | None = None
    scaling: float | None = None
    causal: bool = False
    mask_kwarg: str | None = "attention_mask"

    def __post_init__(self) -> None:
        if not isinstance(self.heads, int) or isinstance(self.heads, bool) or self.heads < 1:
            raise ValueError(f"Expected `heads` of AttentionSpec to be a positive int, got {self.heads!r}")

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Scores | None:
        x = _first_arg(args, kwargs, "hidden_states")
        if x is None:
            return None
        q, k = module.get_submodule(self.query)(x), module.get_submodule(self.key)(x)
        q = _heads(q, self.heads)
        k = _repeat_kv(_heads(k, self.kv_heads or self.heads), self.heads)
        scaling = self.scaling if self.scaling is not None else q.shape[-1] ** -0.5
        mask = kwargs.get(self.mask_kwarg) if self.mask_kwarg else None
        return Scores(q, k, scaling, mask if isinstance(mask, Tensor) else None, self.causal and mask is None)


def _first_arg(args: tuple[Any, ...], kwargs: Mapping[str, Any], name: str) -> Tensor | None:
    x = args[0] if args else kwargs.get(name)
    return x if isinstance(x, Tensor) and x.is_floating_point() and x.dim() == 3 else None


def _heads(x: Tensor, heads: int) -> Tensor:
    """``(B, L, heads * D) -> (B, heads, L, D)``."""
    return x.view(*x.shape[:-1], heads, -1).transpose(1, 2)


def _repeat_kv(k: Tensor, heads: int) -> Tensor:
    groups = heads // k.shape[1]
    return k if groups == 1 else k.repeat_interleave(groups, dim=1)


def _hf_mask(kwargs: Mapping[str, Any]) -> Tensor | None:
    mask = kwargs.get("attention_mask")
    return mask if isinstance(mask, Tensor) else None


def gpt2_adapter(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Scores | None:
    x = _first_arg(args, kwargs, "hidden_states")
    if x is None or kwargs.get("encoder_hidden_states") is not None:
        return None
    q, k, _v = module.c_attn(x).split(module.split_size, dim=2)
    heads = module.num_heads
    mask = _hf_mask(kwargs)  # None under SDPA without padding: then the causal flag decides, as in SDPA
    return Scores(
        _heads(q, heads), _heads(k, heads), float(module.scaling), mask, bool(module.is_causal) and mask is None
    )


def bert_adapter(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Scores | None:
    x = _first_arg(args, kwargs, "hidden_states")
    if x is None or kwargs.get("encoder_hidden_states") is not None:
        return None
    heads = module.num_attention_heads
    q, k = _heads(module.query(x), heads), _heads(module.key(x), heads)
    scaling = float(getattr(module, "scaling", module.attention_head_size**-0.5))
    mask = _hf_mask(kwargs)
    return Scores(q, k, scaling, mask, bool(getattr(module, "is_causal", False)) and mask is None)


def _qk_norm(module: Any, which: str) -> Any:
    """The module's QK-norm for ``which`` ("q" or "k"): ``q_norm`` (Qwen3, OLMo2, Gemma3), ``q_layernorm`` (Phi)."""
    for name in (f"{which}_norm", f"{which}_layernorm"):
        norm = getattr(module, name, None)
        if callable(norm):
            return norm
    return None


def _project(module: Any, which: str, x: Tensor, d: int) -> Tensor:
    """``(B, heads, L, d)`` queries or keys as the module computes them, its QK-norm included: over all
    heads at once before the split (OLMo2) or over each head's ``d`` values (Qwen3, Gemma3, Phi)."""
    y = getattr(module, f"{which}_proj")(x)
    norm = _qk_norm(module, which)
    weight = getattr(norm, "weight", None)
    if norm is not None and isinstance(weight, Tensor) and weight.shape[-1] == y.shape[-1] != d:
        y, norm = norm(y), None  # normalised across heads
    y = y.view(*x.shape[:-1], -1, d)
    return (norm(y) if norm is not None else y).transpose(1, 2)


def _rotate(rotary: Any, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary embedding on the first ``cos.shape[-1]`` dims of each head, the rest passed (Phi's partial rotary)."""
    r = cos.shape[-1]
    if r >= q.shape[-1]:
        return rotary(q, k, cos, sin)  # type: ignore[no-any-return]
    q_rot, k_rot = rotary(q[..., :r], k[..., :r], cos, sin)
    return torch.cat([q_rot, q[..., r:]], dim=-1), torch.cat([k_rot, k[..., r:]], dim=-1)


def _rotary_of(module: Any, position: Any, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor] | None:
    """``q, k`` through the module's own rotary embedding (``None``: a rotation we cannot reproduce)."""
    if not (isinstance(position, (tuple, list)) and len(position) == 2):
        return q, k
    rotary = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
    return None if rotary is None else _rotate(rotary, q, k, position[0], position[1])


def llama_adapter(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Scores | None:
    x = _first_arg(args, kwargs, "hidden_states")
    position = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
    if x is None:
        return None
    d = module.head_dim
    rotated = _rotary_of(module, position, _project(module, "q", x, d), _project(module, "k", x, d))
    if rotated is None:
        return None  # a rotary model whose rotation we cannot reproduce: read nothing rather than wrong
    q, k = rotated
    mask = _hf_mask(kwargs)
    scaling = float(getattr(module, "scaling", d**-0.5))
    cap = getattr(module, "attn_logit_softcapping", None)
    causal = bool(getattr(module, "is_causal", True)) and mask is None
    return Scores(q, _repeat_kv(k, q.shape[1]), scaling, mask, causal, float(cap) if cap else None)


def neox_adapter(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Scores | None:
    """GPT-NeoX (Pythia): one ``query_key_value`` projection laid out per head as ``[q | k | v]``, partial rotary."""
    x = _first_arg(args, kwargs, "hidden_states")
    if x is None:
        return None
    d = module.head_size
    q, k, _v = module.query_key_value(x).view(*x.shape[:-1], -1, 3 * d).transpose(1, 2).chunk(3, dim=-1)
    rotated = _rotary_of(module, kwargs.get("position_embeddings"), q, k)
    if rotated is None:
        return None
    mask = _hf_mask(kwargs)
    return Scores(*rotated, float(module.scaling), mask, bool(getattr(module, "is_causal", True)) and mask is None)


def distilbert_adapter(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Scores | None:
    """DistilBERT: ``q_lin``/``k_lin`` projections, bidirectional."""
    x = _first_arg(args, kwargs, "hidden_states")
    if x is None:
        return None
    d = module.attention_head_size
    q = module.q_lin(x).view(*x.shape[:-1], -1, d).transpose(1, 2)
    k = module.k_lin(x).view(*x.shape[:-1], -1, d).transpose(1, 2)
    return Scores(q, k, float(getattr(module, "scaling", d**-0.5)), _hf_mask(kwargs), False)


def falcon_adapter(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Scores | None:
    """Falcon: one ``query_key_value`` in one of three layouts (grouped per key head, multi-query, or
    interleaved per head), rotary, or ALiBi carried in the mask."""
    x = _first_arg(args, kwargs, "hidden_states")
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    mask = mask if isinstance(mask, Tensor) else None
    alibi = bool(getattr(module.config, "alibi", False))
    if x is None or (alibi and mask is None):  # ALiBi's bias rides in the mask: without it, nothing to rebuild
        return None
    d, heads, kv_heads = module.head_dim, module.num_heads, module.num_kv_heads
    fused = module.query_key_value(x).view(*x.shape[:-1], -1, d)
    if module.new_decoder_architecture:  # per key head: its queries, then its key and its value
        grouped = fused.view(*x.shape[:-1], kv_heads, -1, d)
        q, k = grouped[..., :-2, :].flatten(-3, -2), grouped[..., -2, :]
    elif module.multi_query:
        q, k, _v = fused.split([heads, 1, 1], dim=-2)
    else:
        q, k, _v = fused.unflatten(-2, (heads, 3)).unbind(-2)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if not alibi:
        rotated = _rotary_of(module, kwargs.get("position_embeddings"), q, k)
        if rotated is None:
            return None
        q, k = rotated
    causal = bool(getattr(module, "is_causal", True)) and mask is None
    return Scores(q, _repeat_kv(k, heads), float(module.scaling), mask, causal)


def t5_adapter(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Scores | None:
    """T5 self-attention: unscaled ``q k^T`` plus the learned relative-position bias and the additive mask.

    The first layer computes the bias itself (``compute_bias``); later layers are handed it. Up to
    transformers 4.x that handed-on bias already holds the mask; from 5.x (modules with a
    ``scaling``) the mask is added separately. Cross-attention (``key_value_states``) and a decoder
    step that reads cached keys are not read.
    """
    x = _first_arg(args, kwargs, "hidden_states")
    given = dict(zip(("hidden_states", "mask", "key_value_states", "position_bias"), args)) | kwargs
    if x is None or given.get("key_value_states") is not None:
        return None
    cache = given.get("cache", given.get("past_key_values", given.get("past_key_value")))
    if cache is not None and getattr(cache, "get_seq_length", lambda *_: 0)(module.layer_idx):
        return None  # keys from earlier steps that this call's input does not hold
    q, k = _heads(module.q(x), module.n_heads), _heads(module.k(x), module.n_heads)
    length = x.shape[1]
    mask, bias = given.get("mask"), given.get("position_bias")
    mask = mask.float() if isinstance(mask, Tensor) else None
    handed = isinstance(bias, Tensor)
    if not handed and module.has_relative_attention_bias:
        bias = module.compute_bias(length, length, device=x.device)
    additive = bias.float() if isinstance(bias, Tensor) else None
    if mask is not None and (hasattr(module, "scaling") or not handed):
        additive = mask if additive is None else additive + mask
    causal = bool(getattr(module, "is_decoder", False)) and mask is None
    return Scores(q, k, float(getattr(module, "scaling", 1.0)), additive, causal)


def _as_additive(mask: Tensor, disallow_when: bool = True) -> Tensor:
    """torch's bool masks say True = may NOT attend; turn them (or float ones) into additive float."""
    if mask.dtype == torch.bool:
        blocked = mask if disallow_when else ~mask
        return torch.zeros(mask.shape, device=mask.device).masked_fill_(blocked, float("-inf"))
    return mask.float()


def mha_adapter(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Scores | None:
    assert isinstance(module, nn.MultiheadAttention)
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
    given = dict(zip(names, args)) | kwargs
    query, key = given.get("query"), given.get("key")
    if not isinstance(query, Tensor) or not isinstance(key, Tensor) or query.dim() != 3:
        return None
    if module.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)  # (L, B, E)
    e, heads = module.embed_dim, module.num_heads
    if module._qkv_same_embed_dim:
        w_q, w_k = module.in_proj_weight[:e], module.in_proj_weight[e : 2 * e]
    else:
        w_q, w_k = module.q_proj_weight, module.k_proj_weight
    b_q = b_k = None
    if module.in_proj_bias is not None:
        b_q, b_k = module.in_proj_bias[:e], module.in_proj_bias[e : 2 * e]
    q = nn.functional.linear(query, w_q, b_q).permute(1, 0, 2)  # (B, L, E)
    k = nn.functional.linear(key, w_k, b_k).permute(1, 0, 2)
    q, k = _heads(q, heads), _heads(k, heads)
    batch, length, keys = q.shape[0], q.shape[2], k.shape[2]
    mask: Tensor | None = None
    padding, attn_mask = given.get("key_padding_mask"), given.get("attn_mask")
    if isinstance(padding, Tensor):
        mask = _as_additive(padding).view(batch, 1, 1, keys)
    if isinstance(attn_mask, Tensor):
        extra = _as_additive(attn_mask)
        extra = extra.view(1, 1, length, keys) if extra.dim() == 2 else extra.view(batch, heads, length, keys)
        mask = extra if mask is None else mask + extra
    causal = bool(given.get("is_causal", False)) and not isinstance(attn_mask, Tensor)
    return Scores(q, k, q.shape[-1] ** -0.5, mask, causal)


def recognise(module: nn.Module) -> Adapter | None:
    """The built-in adapter for ``module``, or ``None`` when it is not an attention module we know."""
    if isinstance(module, nn.MultiheadAttention):
        if module.bias_k is not None or module.add_zero_attn:
            return None
        return mha_adapter
    has = lambda *names: all(hasattr(module, n) for n in names)  # noqa: E731
    if has("c_attn", "split_size", "num_heads", "scaling", "is_causal"):
        return gpt2_adapter
    if has("query", "key", "num_attention_heads", "attention_head_size"):
        return bert_adapter
    if has("q_proj", "k_proj", "head_dim") and type(module).__name__.endswith("Attention"):
        return llama_adapter
    if has("query_key_value", "head_size", "rotary_ndims", "scaling"):
        return neox_adapter
    if has("q_lin", "k_lin", "attention_head_size"):
        return distilbert_adapter
    if type(module).__name__ in ("T5Attention", "MT5Attention") and has("q", "k", "n_heads", "compute_bias"):
        return t5_adapter
    falcon = ("query_key_value", "new_decoder_architecture", "multi_query", "num_kv_heads", "head_dim", "scaling")
    if has(*falcon, "config") and not hasattr(module, "_split_heads"):  # transformers 4.x Falcon splits otherwise
        return falcon_adapter
    return None


def find_attention(
    model: nn.Module, extra: Mapping[str, AttentionSpec] | None = None
) -> list[tuple[str, nn.Module, Adapter]]:
    """Every attention module in ``model`` with its adapter: user specs first (name or regex), then built-ins."""
    patterns = [(re.compile(key), spec) for key, spec in (extra or {}).items()]
    found: list[tuple[str, nn.Module, Adapter]] = []
    for name, module in model.named_modules():
        adapter: Adapter | None = next((s for p, s in patterns if name == p.pattern or p.fullmatch(name)), None)
        adapter = adapter or recognise(module)
        if adapter is not None:
            found.append((name, module, adapter))
    return found


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every residual block (by class name, see :data:`BLOCK_CLASSES`)."""
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in BLOCK_CLASSES]


def validate_attention_spec(value: object) -> bool | dict[str, AttentionSpec]:
    """Check the ``attention`` argument: a bool, or ``{name or regex: AttentionSpec}``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, AttentionSpec) for k, v in value.items()
    ):
        for key in value:
            try:
                re.compile(key)
            except re.error as err:
                raise ValueError(
                    f"Expected the keys of `attention` to be names or regexes, got {key!r}: {err}"
                ) from None
        return dict(value)
    raise TypeError(f"Expected `attention` to be a bool or a dict of {{name or regex: AttentionSpec}}, got {value!r}")
