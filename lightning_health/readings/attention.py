"""Transformer readings: attention entropy and logit maxima, and massive activations of the residual stream.

Pure on-device torch functions, recomputed on sampled steps from tensors the hooks captured; no host
transfer, no Python loop over elements. Testable against an eager softmax (tests/test_attention.py).

Attention (:func:`attention_totals`): the scores ``q.k * scaling`` that fused kernels (SDPA, flash)
never materialise are rebuilt in float32, ``chunk`` queries at a time, so the temporary stays near
``CHUNK_ELEMENTS`` floats whatever the sequence length. Cost per call: ``B*H*L*S*D`` multiply-adds
for the scores (as much as the model's own ``q @ k^T``) and a few elementwise passes over each
``B*H*chunk*S`` block; nothing is kept once the per-head totals are taken.

Massive activations (:func:`massive_totals`, Sun et al., 2024): the largest ``|value|`` over the
median ``|value|`` of a residual-stream tensor, and the share of channels (last dim) whose largest
``|value|`` exceeds ``factor`` (100) times that median. The maxima are exact; the median is taken
on a strided sample of at most ``median_samples`` values (a stride coprime with the channel count,
so every channel is sampled): for a 64k-value sample the median's rank error is about
``1/sqrt(65536) = 0.4%`` of the distribution, far inside what a 100x criterion can notice, at a cost
of one ``median`` over 64k values instead of a sort of the whole tensor.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 22  # float32 scores per query chunk on a CPU (16 MiB); two temporaries this size live at once
ACCELERATOR_CHUNK_ELEMENTS = 1 << 24
"""Scores per chunk on an accelerator (64 MiB): at the CPU's size a GPT-2-small layer at batch 8 x 1024
tokens took 25 chunks of ~27 small kernels each, three quarters of a sampled step's launches."""
MEDIAN_SAMPLES = 1 << 16


def _allowed_and_bias(mask: Tensor | None, rows: slice) -> tuple[Tensor | None, Tensor | None]:
    """Split a mask into "may attend" (bool) and a finite additive bias (float32), for query ``rows``.

    ``mask`` is broadcastable to ``(B, H, L, S)``: bool (True = may attend, as Hugging Face's SDPA
    masks) or float added to the scores (0 / ``-inf`` or ``finfo.min``, as the eager masks; finite
    non-zero values, e.g. ALiBi, are a bias the softmax sees).
    """
    if mask is None:
        return None, None
    part = mask[..., rows, :] if mask.shape[-2] != 1 else mask
    if part.dtype == torch.bool:
        return part, None
    floor = torch.finfo(part.dtype).min / 2
    allowed = part > floor
    return allowed, torch.where(allowed, part.float(), 0.0)


def _full_precision(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Autocast off: the hooks run inside the model's forward, where ``bf16-mixed`` would turn the
    float32 scores' ``matmul`` back into bfloat16 (and the float32 floor of the softmax's shift
    would not fit it). A device autocast does not know has nothing to turn off."""
    known = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
    if known is not None and not known(device.type):
        return contextlib.nullcontext()
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # an older torch refusing the device type
        return contextlib.nullcontext()


def attention_totals(
    q: Tensor,
    k: Tensor,
    scaling: float,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    chunk_elements: int | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-head attention entropy totals and logit maxima, recomputed from queries and keys.

    Args:
        q: queries ``(B, H, L, D)``.
        k: keys ``(B, H, S, D)`` (grouped-query keys already repeated to ``H`` heads).
        scaling: the score scale (``1/sqrt(D)`` usually).
        mask: optional, broadcastable to ``(B, H, L, S)``; see :func:`_allowed_and_bias`.
        causal: query ``i`` may attend to keys ``j <= i + S - L`` only.
        chunk_elements: scores materialised at once (queries per chunk = this / (B*H*S));
            ``None``: :data:`CHUNK_ELEMENTS` on a CPU, :data:`ACCELERATOR_CHUNK_ELEMENTS` elsewhere.
        softcap: scores become ``softcap * tanh(s / softcap)`` before the softmax (Gemma 2's logit
            soft-capping); the logit maximum is then the capped one, what the softmax sees.

    Returns:
        ``(entropy_sum, rows, logit_max)``, each ``(H,)``: float64 sums over batch and query
        positions of each query's attention entropy in nats, the number of query rows with at least
        one allowed key, and the float32 largest ``q.k * scaling`` over allowed positions
        (``-inf`` where there is none). The additive bias enters the entropy (it is what the softmax
        sees) but not the logit maximum.

    Example:
        >>> q = torch.zeros(1, 2, 3, 4); k = torch.zeros(1, 2, 3, 4)
        >>> ent, rows, top = attention_totals(q, k, 0.5)
        >>> round(float(ent[0] / rows[0]), 4) == round(math.log(3), 4)
        True
    """
    with torch.no_grad(), _full_precision(q.device):
        q, k = q.detach().float(), k.detach().float()
        b, h, length, _ = q.shape
        keys = k.shape[-2]
        if chunk_elements is None:
            chunk_elements = CHUNK_ELEMENTS if q.device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
        step = max(1, chunk_elements // max(1, b * h * keys))
        ent = torch.zeros(h, dtype=torch.float64, device=q.device)
        rows = torch.zeros(h, dtype=torch.float64, device=q.device)
        top = torch.full((h,), -math.inf, dtype=torch.float32, device=q.device)
        kt = k.transpose(-1, -2)
        key_pos = torch.arange(keys, device=q.device) if causal else None
        floor = torch.finfo(torch.float32).min
        for start in range(0, length, step):
            stop = min(length, start + step)
            scores = torch.matmul(q[:, :, start:stop], kt).mul_(scaling)  # (B, H, c, S)
            if softcap:
                scores = scores.div_(softcap).tanh_().mul_(softcap)
            allowed, bias = _allowed_and_bias(mask, slice(start, stop))
            blocked = None if allowed is None else ~allowed
            if key_pos is not None:  # key j is hidden from query i when j > i + S - L
                later = key_pos > torch.arange(start + keys - length, stop + keys - length, device=q.device)[:, None]
                blocked = later if blocked is None else blocked | later
            if blocked is not None:
                scores.masked_fill_(blocked, -math.inf)
            top = torch.maximum(top, scores.amax(dim=(0, 2, 3)))
            if bias is not None:
                scores.add_(bias)
            # entropy = log(sum e^z) - sum(e^z * z) / sum(e^z) with z = s - max(s): the softmax's own
            # shift, so e^z <= 1; a row with no allowed key sums to 0 and is left out
            z = scores.sub_(scores.amax(dim=-1, keepdim=True).clamp_(min=floor))
            e = torch.exp(z)
            if blocked is not None:
                z.masked_fill_(blocked, 0.0)  # e^z is 0 there; 0 * -inf would be NaN
            total = e.sum(dim=-1)
            weighted = e.mul_(z).sum(dim=-1)
            valid = total != 0  # NaN scores stay valid: the entropy then reads NaN, as it should
            # clamped: with logits in the thousands the float32 difference can read a hair below 0
            entropy = torch.where(valid, total.log() - weighted / total, 0.0).clamp_(min=0.0)
            ent += entropy.sum(dim=(0, 2), dtype=torch.float64)
            rows += valid.sum(dim=(0, 2), dtype=torch.float64)
        return ent, rows, top


def massive_totals(x: Tensor, factor: float = 100.0, median_samples: int = MEDIAN_SAMPLES) -> Tensor:
    """``[max|x| / median|x|, share of channels with max|x| > factor * median|x|]`` as a float64 ``(2,)``.

    Channels are the last dimension. A tensor whose median ``|x|`` is 0 reads ``[0, 0]``: its
    median says nothing about the scale (it is not a residual stream).

    Example:
        >>> x = torch.ones(4, 8); x[0, 3] = 500.0
        >>> massive_totals(x).tolist()
        [500.0, 0.125]
    """
    with torch.no_grad():
        a = x.detach().abs()
        if a.dtype not in (torch.float32, torch.float64):
            a = a.float()
        channels = a.shape[-1] if a.dim() else 1
        a = a.reshape(-1, channels)
        flat = a.reshape(-1)
        if flat.numel() > median_samples:
            stride = flat.numel() // median_samples
            while math.gcd(stride, channels) != 1:
                stride += 1
            flat = flat[::stride]
        median = flat.median()
        channel_max = a.amax(dim=0)
        ok = median > 0
        ratio = torch.where(ok, channel_max.amax() / torch.where(ok, median, 1.0), 0.0)
        share = torch.where(ok, (channel_max > factor * median).to(torch.float64).mean(), 0.0)
        return torch.stack([ratio.to(torch.float64), share.to(torch.float64)])
