"""The monitor's side of a rescue: settings, cadence, masks from the windows, hook moves, event log, resume.

:class:`~lightning_health.rescue.policy.RescuePolicy` changes weights or modules given masks; this
module decides *when* (every ``rescue_every``-th sampled step, once a layer's window is full) and
*on what* (the accumulator's synced dead | dormant masks, the same on every rank), keeps the
monitor's view of the model in step with the change (after a ``leaky`` swap the forward hook
moves to the new module; after any rescue the layer's window starts afresh, so stale evidence does
not trigger the rescue again), and keeps the record that a checkpoint carries: the events, from
which ``leaky`` swaps are replayed on a freshly built model before training continues (``reinit``
changes live in the weights and optimizer state, which the checkpoint already holds).

It never logs or prints; the callback does that with :meth:`Rescuer.scalars` and the events.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_health.capture.hooks import Capture
from lightning_health.pipeline.accumulate import Accumulator
from lightning_health.rescue.policy import RescueEvent, RescueMode, RescuePolicy
from lightning_health.rescue.swap import replace_activation

RescueInit = Literal["auto", "kaiming", "xavier"]
_MODES = (None, "reinit", "leaky")
_INITS = ("auto", "kaiming", "xavier")


def _number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class RescueSettings:
    """The rescue arguments of :class:`~lightning_health.HealthMonitor`, validated by argument name.

    Raises:
        TypeError, ValueError: naming the ``HealthMonitor`` argument, the value and what is allowed.
    """

    rescue: RescueMode | None = None
    rescue_every: int = 10
    dormant_threshold: float | None = 0.025
    rescue_init: RescueInit = "auto"
    leaky_slope: float = 0.01
    rescue_seed: int = 0

    def __post_init__(self) -> None:
        if self.rescue not in _MODES:
            raise ValueError(f"Expected `rescue` to be one of {_MODES}, got {self.rescue!r}")
        if isinstance(self.rescue_every, bool) or not isinstance(self.rescue_every, int) or self.rescue_every < 1:
            raise ValueError(
                f"Expected `rescue_every` to be an int >= 1 (sampled steps between rescues), got {self.rescue_every!r}"
            )
        tau = self.dormant_threshold
        if tau is not None and not (_number(tau) and 0 <= tau < 1):  # type: ignore[operator]
            raise ValueError(
                f"Expected `dormant_threshold` to be None (no dormancy reading) or a number in [0, 1), got {tau!r}; "
                "Sokar et al. use 0.0 (exactly silent units) and 0.025"
            )
        if self.rescue_init not in _INITS:
            raise ValueError(f"Expected `rescue_init` to be one of {_INITS}, got {self.rescue_init!r}")
        if not (_number(self.leaky_slope) and 0 < self.leaky_slope < 1):
            raise ValueError(f"Expected `leaky_slope` to be a number in (0, 1), got {self.leaky_slope!r}")
        if isinstance(self.rescue_seed, bool) or not isinstance(self.rescue_seed, int):
            raise TypeError(f"Expected `rescue_seed` to be an int, got {self.rescue_seed!r}")


def _event_state(event: RescueEvent) -> dict[str, Any]:
    state = asdict(event)
    state["units"], state["changed"] = list(event.units), list(event.changed)
    return state


def _event_from_state(state: Mapping[str, Any]) -> RescueEvent:
    return RescueEvent(
        step=int(state["step"]),
        layer=str(state["layer"]),
        action=str(state["action"]),
        units=tuple(int(u) for u in state.get("units", ())),
        changed=tuple(str(c) for c in state.get("changed", ())),
    )


class Rescuer:
    """Applies the configured rescue during a run and remembers what it did.

    Args:
        settings: the validated rescue arguments.
    """

    def __init__(self, settings: RescueSettings) -> None:
        self.settings = settings
        self.events: list[RescueEvent] = []
        self.sampled = 0  # sampled steps finished so far (the rescue cadence counts these)
        self._unbind()

    def _unbind(self) -> None:
        self._policy: RescuePolicy | None = None
        self._model: nn.Module | None = None
        self._capture: Capture | None = None
        self._accumulator: Accumulator | None = None
        self._skipped: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:  # the callback is pickled by ddp_spawn: no module references
        return {"settings": self.settings, "events": list(self.events), "sampled": self.sampled}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.settings, self.events, self.sampled = state["settings"], state["events"], state["sampled"]
        self._unbind()

    # -- lifetime ------------------------------------------------------------------------------------
    def replay(self, model: nn.Module) -> list[str]:
        """Redo the recorded ``leaky`` swaps on ``model`` (a fresh one built with ReLU); returns the layers."""
        done = []
        slope = self.settings.leaky_slope
        for event in self.events:
            if event.action != "leaky":
                continue
            try:
                module = model.get_submodule(event.layer)
            except AttributeError:
                continue
            if type(module) is nn.ReLU:
                replace_activation(model, nn.ReLU, lambda: nn.LeakyReLU(slope), names=[event.layer])
                done.append(event.layer)
        return done

    def bind(
        self, model: nn.Module, capture: Capture, accumulator: Accumulator, sharded: bool = False
    ) -> dict[str, str]:
        """Map the monitored layers to what the rescue changes; returns ``{layer: why refused}``.

        Layers already made leaky by a recorded event are neither targets nor refused. Under
        sharding (``ModelParallelStrategy``) every layer is refused: a recycled unit's incoming and
        outgoing weights and its optimizer state live in shards on different ranks (DTensors), which
        the treatments do not update; the monitor keeps watching.
        """
        self._model, self._capture, self._accumulator = model, capture, accumulator
        if self.settings.rescue is None:
            return {}
        if sharded:
            why = "its parameters are sharded (ModelParallelStrategy); rescue under sharding is not supported yet"
            return {layer.name: why for layer in capture.layers}
        self._policy = RescuePolicy(
            self.settings.rescue,
            init=self.settings.rescue_init,
            negative_slope=self.settings.leaky_slope,
            seed=self.settings.rescue_seed,
        )
        swapped = {e.layer for e in self.events if e.action == "leaky"}
        names = [layer.name for layer in capture.layers if layer.name not in swapped]
        return self._policy.prepare(model, names)

    def unbind(self) -> None:
        self._unbind()

    def moved_hooks(self, layers: Sequence[str]) -> None:
        """Point the capture at the current modules of ``layers`` (after a swap), and restart their windows."""
        if self._model is None or self._capture is None or self._accumulator is None:
            return
        index = {layer.name: i for i, layer in enumerate(self._capture.layers)}
        for name in layers:
            if name in index:
                self._capture.replace(index[name], self._model.get_submodule(name))
                self._accumulator.reset_layer(index[name])

    # -- during training ---------------------------------------------------------------------------
    def due(self) -> bool:
        """Count one finished sampled step; whether it is a rescue step (every ``rescue_every``-th one).

        Sampled steps are counted, not optimizer steps, so the cadence follows the monitor's
        schedule (an adaptive interval, or a burst of dense sampling after a critical finding).
        """
        self.sampled += 1
        return self._policy is not None and self.sampled % self.settings.rescue_every == 0

    def apply(self, step: int, optimizers: Sequence[torch.optim.Optimizer]) -> tuple[list[RescueEvent], list[str]]:
        """Rescue every target layer whose window is full; every rank must call this at the same step.

        Returns:
            The new events, and the target layers skipped for the first time because their module
            is called more than once per forward (a unit's evidence mixes several uses).
        """
        policy, capture, accumulator, model = self._policy, self._capture, self._accumulator, self._model
        if policy is None or capture is None or accumulator is None or model is None:
            return [], []
        targets = policy.targets
        masks: dict[str, Tensor] = {}
        newly_skipped = []
        for index, layer in enumerate(capture.layers):
            if layer.name not in targets:
                continue
            if accumulator.calls_per_step(index) > 1:
                if layer.name not in self._skipped:
                    self._skipped.add(layer.name)
                    newly_skipped.append(layer.name)
                continue
            mask = accumulator.rescue_mask(index)
            if mask is not None:
                masks[layer.name] = mask
        events = policy.apply(model, masks, step, optimizers)
        position = {layer.name: i for i, layer in enumerate(capture.layers)}
        for event in events:
            if event.action == "leaky":
                capture.replace(position[event.layer], model.get_submodule(event.layer))
            accumulator.reset_layer(position[event.layer])  # the old evidence describes the old units
        self.events += events
        return events, newly_skipped

    @staticmethod
    def scalars(events: Sequence[RescueEvent]) -> dict[str, float]:
        """``health/rescued_units/<layer>`` for each event."""
        return {f"health/rescued_units/{e.layer}": float(len(e.units)) for e in events}

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"events": [_event_state(e) for e in self.events], "sampled": self.sampled}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the events and, when already bound to a model, replay the ``leaky`` swaps now."""
        self.events = [_event_from_state(s) for s in state.get("events", [])]
        self.sampled = int(state.get("sampled", 0))
        if self._model is not None:
            swapped = self.replay(self._model)
            self.moved_hooks(swapped)
            if self._policy is not None:
                for name in swapped:
                    self._policy.mark_done(name)


def warn_refused(refused: Mapping[str, str], mode: str) -> None:
    """One warning per layer the rescue cannot treat."""
    for layer, why in refused.items():
        warnings.warn(f"HealthMonitor(rescue={mode!r}) will not treat `{layer}`: {why}", RuntimeWarning, stacklevel=3)
