"""Hooks for the transformer readings: attention pre-hooks and residual-block forward hooks.

Registered once when fit starts (the layout of the packed vector is fixed then: per attention
module its heads, per block two numbers), gated by :attr:`TransformerCapture.armed` on every other
step. On a sampled step each hook reduces on the device into fixed-size buffers (micro-batches and
repeated calls fold in: entropy sums and row counts add, maxima take the max); nothing is read on
the host. :meth:`TransformerCapture.pack` hands two float64 vectors to the step's single collective
and transfer.

Packed layout, two parts of the step's one collective. Summed across ranks: per attention module
``H`` per-head entropy sums and ``H`` row counts, so the entropy is the global batch's whatever the
number of ranks (zeros: not seen on this rank). Reduced with ``max``: per attention module ``H``
per-head logit maxima and the largest key count, per block ``massive_ratio`` and
``massive_channels`` (``-inf``: not seen on this rank).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Set
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_health.capture.attention import Adapter, AttentionSpec, find_attention, find_blocks
from lightning_health.capture.hooks import first_tensor
from lightning_health.readings.attention import attention_totals, massive_totals
from lightning_health.readings.fused import nan_wins


@dataclasses.dataclass
class _AttentionState:
    name: str
    module: nn.Module
    adapter: Adapter
    heads: int = 0  # known after the first sampled call; fixes the layout
    entropy: Tensor | None = None  # (H,) float64 sums
    rows: Tensor | None = None  # (H,) float64
    top: Tensor | None = None  # (H,) float32 maxima
    keys: int = 0


@dataclasses.dataclass
class TransformerReadings:
    """One sampled step's transformer readings on the host."""

    metrics: dict[str, dict[str, float]]  # layer -> {attn_entropy, attn_entropy_min, attn_logit_max | massive_*}
    head_entropy: dict[str, list[float]]  # attention layer -> per-head mean entropy (nats)
    head_logit_max: dict[str, list[float]]
    max_keys: dict[str, int]


def _heads_of(module: nn.Module) -> int:
    for attr in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(module, attr, None), int):
            return int(getattr(module, attr))
    config = getattr(module, "config", None)
    if isinstance(getattr(config, "num_attention_heads", None), int):
        return int(config.num_attention_heads)  # type: ignore[union-attr]
    return 0


class TransformerCapture:
    """Attention and residual-block hooks of one model (see the module docstring)."""

    def __init__(
        self, model: nn.Module, specs: Mapping[str, AttentionSpec] | None = None, skip: Set[int] = frozenset()
    ) -> None:
        """``skip``: ``id`` of modules no hook may go on (inside ``torch.compile(fullgraph=True)``)."""
        found = find_attention(model, specs)
        self.left_out = [n for n, m, _a in found if id(m) in skip]  # recognised, but no hook may go there
        self.attention = [_AttentionState(n, m, a) for n, m, a in found if id(m) not in skip]
        for state in self.attention:
            spec_heads = getattr(state.adapter, "heads", None)
            state.heads = spec_heads if isinstance(spec_heads, int) else _heads_of(state.module)
        self.attention = [s for s in self.attention if s.heads > 0]
        skipped = {name for name, m in model.named_modules() if id(m) in skip}
        self.unrecognised = _unrecognised_attention(model, {s.name for s in self.attention} | skipped)
        self._block_modules = {name: m for name, m in find_blocks(model) if id(m) not in skip}
        self.blocks = list(self._block_modules)
        self._massive: dict[str, Tensor] = {}
        self.armed = False
        self._handles: list[RemovableHandle] = []
        self._broken: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.attention or self.blocks)

    def attach(self) -> None:
        if self._handles:
            return
        for index, state in enumerate(self.attention):
            hook = _PreHook(self, index)
            self._handles.append(state.module.register_forward_pre_hook(hook, with_kwargs=True))
        for name in self.blocks:
            self._handles.append(self._block_modules[name].register_forward_hook(_BlockHook(self, name)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.armed = False

    def reset(self) -> None:
        for state in self.attention:
            state.entropy = state.rows = state.top = None
            state.keys = 0
        self._massive = {}

    # -- hooks ---------------------------------------------------------------------------------
    @torch.compiler.disable
    def on_attention(self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        state = self.attention[index]
        if not self.armed or state.name in self._broken:
            return
        try:
            with torch.no_grad():
                scores = state.adapter(state.module, args, kwargs)
                if scores is None or scores.q.shape[1] != state.heads:
                    return
                ent, rows, top = attention_totals(
                    scores.q, scores.k, scores.scaling, mask=scores.mask, causal=scores.causal, softcap=scores.softcap
                )
        except Exception as err:  # a model we misread is a warning, never a crash of the user's run
            self._broken.add(state.name)
            warnings.warn(
                f"HealthMonitor cannot read attention of `{state.name}` ({type(err).__name__}: {err}); "
                "it is skipped. Register it with HealthMonitor(attention={name: AttentionSpec(...)}).",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        if state.entropy is None or state.rows is None or state.top is None:
            state.entropy, state.rows, state.top = ent, rows, top
        else:
            state.entropy.add_(ent)
            state.rows.add_(rows)
            state.top = torch.maximum(state.top, top)
        state.keys = max(state.keys, int(scores.k.shape[-2]))

    @torch.compiler.disable
    def on_block(self, name: str, output: Any) -> None:
        if not self.armed:
            return
        x = first_tensor(output)
        if x is None or x.dim() < 2:
            return
        totals = massive_totals(x)
        old = self._massive.get(name)
        self._massive[name] = totals if old is None else torch.maximum(old, totals)

    # -- the one transfer ------------------------------------------------------------------------
    def pack(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """This step's readings in the layout fixed at registration (see the module doc): the part summed
        across ranks and the part reduced with max, each one float64 vector."""
        sums: list[Tensor] = []
        maxima: list[Tensor] = []
        for state in self.attention:
            h = state.heads
            if state.entropy is None or state.rows is None or state.top is None:  # not seen on this rank
                sums.append(torch.zeros(2 * h, dtype=torch.float64, device=device))
                maxima.append(torch.full((h + 1,), -math.inf, dtype=torch.float64, device=device))
                continue
            keys = torch.full((1,), float(state.keys), dtype=torch.float64, device=device)  # a fill, no copy
            sums += [state.entropy.to(device, torch.float64), state.rows.to(device, torch.float64)]
            maxima += [state.top.to(device, torch.float64), keys]
        for name in self.blocks:
            totals = self._massive.get(name)
            maxima.append(
                totals.to(device)
                if totals is not None
                else torch.full((2,), -math.inf, dtype=torch.float64, device=device)
            )
        return _cat(sums, device), _cat(maxima, device)

    def sum_width(self) -> int:
        return sum(2 * s.heads for s in self.attention)

    def width(self) -> int:
        return self.sum_width() + sum(s.heads + 1 for s in self.attention) + 2 * len(self.blocks)

    def unpack(self, host: list[float]) -> TransformerReadings:
        """The readings from the host numbers of both parts, the summed one first."""
        out = TransformerReadings({}, {}, {}, {})
        sums, maxima = host[: self.sum_width()], host[self.sum_width() :]
        at_sum = at_max = 0
        for state in self.attention:
            h = state.heads
            entropy, rows = sums[at_sum : at_sum + h], sums[at_sum + h : at_sum + 2 * h]
            top, keys = maxima[at_max : at_max + h], maxima[at_max + h]
            at_sum, at_max = at_sum + 2 * h, at_max + h + 1
            heads = [e / r if r > 0 else math.inf for e, r in zip(entropy, rows)]  # inf: a head no rank read
            seen = [v for v in heads if v != math.inf]
            if not seen:
                continue
            out.metrics[state.name] = {
                "attn_entropy": sum(seen) / len(seen),
                "attn_entropy_min": nan_wins(min, seen),
                "attn_logit_max": nan_wins(max, top),
            }
            out.head_entropy[state.name] = heads
            out.head_logit_max[state.name] = list(top)
            out.max_keys[state.name] = int(keys)
        for name in self.blocks:
            ratio, share = maxima[at_max], maxima[at_max + 1]
            at_max += 2
            if math.isfinite(ratio):
                out.metrics[name] = {"massive_ratio": ratio, "massive_channels": share}
        return out


def _cat(parts: list[Tensor], device: torch.device) -> Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)


class _PreHook:
    """Picklable forward pre-hook (``with_kwargs``); never changes the call's arguments."""

    def __init__(self, owner: TransformerCapture, index: int) -> None:
        self.owner, self.index = owner, index

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.owner.armed:
            self.owner.on_attention(self.index, args, kwargs)


def _unrecognised_attention(model: nn.Module, read: set[str]) -> list[str]:
    """Class names of the modules named ``*Attention`` that no adapter reads, outside and around those that are
    (a ``BertAttention`` wrapping the recognised ``BertSelfAttention`` is read through it)."""

    def related(name: str) -> bool:
        return any(name == r or name.startswith(r + ".") or r.startswith(name + ".") for r in read)

    named = {n: m for n, m in model.named_modules() if type(m).__name__.endswith("Attention") and not related(n)}
    # the innermost only: T5's T5LayerSelfAttention wraps the T5Attention that does the work
    innermost = [m for n, m in named.items() if not any(other.startswith(n + ".") for other in named)]
    return sorted({type(m).__name__ for m in innermost})


class _BlockHook:
    def __init__(self, owner: TransformerCapture, name: str) -> None:
        self.owner, self.name = owner, name

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.owner.armed:
            self.owner.on_block(self.name, output)
