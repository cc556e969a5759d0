"""How a monitor applies a rescue to a running model, and the record of what it changed.

:mod:`lightning_health.rescue` holds the treatments as plain functions; this module is the
policy the callback calls: map each monitored layer to its weights once (refusing early and by
name), then, given per-layer masks that are already identical on every rank (synced), apply the
treatment deterministically and return one :class:`RescueEvent` per changed layer, to be logged
and printed. It never talks to Lightning, loggers or collectives.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> policy = RescuePolicy("reinit", seed=0)
    >>> policy.prepare(net, ["1"])
    {}
    >>> dead = torch.zeros(8, dtype=torch.bool)
    >>> dead[[2, 5]] = True
    >>> events = policy.apply(net, {"1": dead}, step=40, optimizers=[torch.optim.SGD(net.parameters(), lr=0.1)])
    >>> print(events[0])
    step 40: reinit 2 unit(s) of `1` [2, 5]: fresh rows of `0`, zeroed columns of `2`
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_health.capture.selection import activation_profile
from lightning_health.rescue.locate import InitName, UnitWeights, find_units_weights
from lightning_health.rescue.recycle import reinit_dead_units
from lightning_health.rescue.swap import replace_activation

RescueMode = Literal["reinit", "leaky"]
_MODES = ("reinit", "leaky")


@dataclass(frozen=True)
class RescueEvent:
    """One rescue applied to one layer.

    Attributes:
        step: the global step at which it was applied.
        layer: qualified name of the monitored activation.
        action: ``"reinit"`` or ``"leaky"``.
        units: indices of the units that were dead/dormant (and, for ``reinit``, recycled).
        changed: qualified names of the modules whose weights or type changed.
    """

    step: int
    layer: str
    action: str
    units: tuple[int, ...]
    changed: tuple[str, ...]

    def __str__(self) -> str:
        shown = list(self.units[:16])
        more = f" +{len(self.units) - 16} more" if len(self.units) > 16 else ""
        head = f"step {self.step}: {self.action} {len(self.units)} unit(s) of `{self.layer}` {shown}{more}"
        if self.action == "reinit":
            norms = "".join(f", reset entries of `{n}`" for n in self.changed[2:])
            return f"{head}: fresh rows of `{self.changed[0]}`, zeroed columns of `{self.changed[1]}`{norms}"
        return f"{head}: replaced by {self.changed[1]}"


def _optimizer_of(param: Tensor, optimizers: Sequence[torch.optim.Optimizer]) -> torch.optim.Optimizer | None:
    for opt in optimizers:
        if any(p is param for group in opt.param_groups for p in group["params"]):
            return opt
    return None


class RescuePolicy:
    """Applies ``reinit`` (ReDo recycling) or ``leaky`` (ReLU -> LeakyReLU) to layers with dead units.

    Args:
        mode: ``"reinit"`` or ``"leaky"``.
        init: weight init for ``reinit``: ``"kaiming"``, ``"xavier"``, or ``"auto"`` (He for
            rectifiers such as ReLU/GELU/SiLU, Glorot for tanh/sigmoid-like activations, per layer).
        negative_slope: LeakyReLU slope for ``leaky``.
        seed: base seed; the weights drawn at step ``s`` use ``seed + s``, so every DDP rank (and a
            resumed run) draws the same ones.

    Raises:
        ValueError: on an unknown ``mode``/``init`` or a slope outside (0, 1).
    """

    def __init__(
        self,
        mode: RescueMode,
        *,
        init: InitName | Literal["auto"] = "kaiming",
        negative_slope: float = 0.01,
        seed: int = 0,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"Expected `rescue` to be None or one of {_MODES}, got {mode!r}")
        if init not in ("kaiming", "xavier", "auto"):
            raise ValueError(f"Expected `init` to be 'kaiming', 'xavier' or 'auto', got {init!r}")
        if (
            isinstance(negative_slope, bool)
            or not isinstance(negative_slope, (int, float))
            or not 0 < negative_slope < 1
        ):
            raise ValueError(f"Expected `negative_slope` to be in (0, 1), got {negative_slope!r}")
        self.mode = mode
        self.init = init
        self.negative_slope = float(negative_slope)
        self.seed = int(seed)
        self._weights: dict[str, UnitWeights] = {}
        self._inits: dict[str, InitName] = {}
        self._relus: set[str] = set()  # leaky: the ReLU layers not yet replaced

    @property
    def targets(self) -> set[str]:
        """The prepared layers a later :meth:`apply` may still change."""
        return set(self._weights) if self.mode == "reinit" else set(self._relus)

    def mark_done(self, name: str) -> None:
        """Stop treating ``name`` (e.g. its ReLU was already swapped when a checkpoint was restored)."""
        self._relus.discard(name)
        self._weights.pop(name, None)

    def prepare(self, model: nn.Module, layers: Sequence[str]) -> dict[str, str]:
        """Map each layer to what the rescue will change; return ``{layer: why not}`` for the refused.

        For ``reinit`` a layer is refused when :func:`find_units_weights` cannot map its units; for
        ``leaky`` when it is not an ``nn.ReLU``. Refused layers are skipped by :meth:`apply`; the
        caller reports them once.
        """
        refused: dict[str, str] = {}
        self._weights, self._relus = {}, set()
        for name in layers:
            if self.mode == "leaky":
                module = model.get_submodule(name)
                if type(module) is nn.ReLU:
                    self._relus.add(name)
                else:
                    refused[name] = f"`{name}` is a {type(module).__name__}, not an nn.ReLU: nothing to make leaky"
                continue
            try:
                self._weights[name] = find_units_weights(model, name)
            except (KeyError, ValueError) as err:
                refused[name] = str(err)
                continue
            rectifier = activation_profile(model.get_submodule(name)).rectifier
            self._inits[name] = self.init if self.init != "auto" else ("kaiming" if rectifier else "xavier")
        return refused

    @torch.no_grad()
    def apply(
        self,
        model: nn.Module,
        masks: Mapping[str, Tensor],
        step: int,
        optimizers: Sequence[torch.optim.Optimizer] = (),
    ) -> list[RescueEvent]:
        """Rescue the masked units of each prepared layer; the same masks give the same change everywhere.

        Args:
            model: the model that :meth:`prepare` mapped.
            masks: per layer, a bool vector of the units to rescue (identical on every rank).
            step: the global step, for the event and the seed.
            optimizers: the optimizers; the one holding a layer's weights has its state reset.

        Returns:
            One event per layer that changed, in the order of ``masks``.

        Raises:
            ValueError: for ``reinit``, when a layer's feeding and consuming weights are held by
                different optimizers.
        """
        names = [n for n in masks if n in (self._weights if self.mode == "reinit" else self._relus)]
        if not names:
            return []
        # One host read for every layer's unit indices (a rescue step is rare).
        flags = torch.cat([masks[n].reshape(-1).to("cpu", torch.bool) for n in names]).tolist()
        events: list[RescueEvent] = []
        start = 0
        for name in names:
            width = masks[name].numel()
            units = tuple(i for i, dead in enumerate(flags[start : start + width]) if dead)
            start += width
            if not units:
                continue
            if self.mode == "leaky":
                new = f"LeakyReLU(negative_slope={self.negative_slope})"
                replace_activation(model, nn.ReLU, lambda: nn.LeakyReLU(self.negative_slope), names=[name])
                self._relus.discard(name)  # once leaky, a layer has no dead units to rescue
                events.append(RescueEvent(step, name, "leaky", units, (name, new)))
                continue
            w = self._weights[name]
            opt_in = _optimizer_of(w.layer_in.weight, optimizers)
            opt_out = _optimizer_of(w.layer_out.weight, optimizers)
            if opt_in is not None and opt_out is not None and opt_in is not opt_out:
                raise ValueError(
                    f"Cannot reinit the units of `{name}`: `{w.layer_in_name}` and `{w.layer_out_name}` are trained "
                    "by different optimizers"
                )
            device = w.layer_in.weight.device
            generator = torch.Generator(device=device).manual_seed(self.seed + step)
            mask = masks[name].to(device=device, dtype=torch.bool)
            reinit_dead_units(
                w.layer_in,
                w.layer_out,
                mask,
                optimizer=opt_in or opt_out,
                norms=w.norms,
                init=self._inits[name],
                generator=generator,
            )
            events.append(RescueEvent(step, name, "reinit", units, (w.layer_in_name, w.layer_out_name, *w.norm_names)))
        return events
