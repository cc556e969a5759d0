"""What outlives a fit (curves, findings, windows) and the host side of a sampled step.

:class:`Record` turns a step's host numbers into logged scalars and histograms, adds them to the
curves, and runs the diagnosis over them. It holds no tensor and no module: it is what a checkpoint
carries and what a re-fit after a crash continues.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_health.capture.hooks import Capture
from lightning_health.capture.selection import MonitoredLayer
from lightning_health.diagnosis import Finding, FindingLog, GradBaseline, Thresholds, evaluate
from lightning_health.diagnosis.context import GRADIENT_READINGS
from lightning_health.pipeline.history import History
from lightning_health.pipeline.learning import UpdateWindow, fold_learning
from lightning_health.pipeline.unpack import LayerReading
from lightning_health.sinks import Histogram

UNIT_FRACTIONS = ("dead_fraction", "alive_fraction", "dormant_fraction", "collapsed_fraction")
"""Per-unit shares that mean nothing for a layer with NaN/Inf outputs: logged as NaN there."""

Snapshot = dict[str, dict[str, float]]
"""``{layer: {metric: value}}`` of one step: what the rules read."""


def layer_metrics(reading: LayerReading) -> dict[str, float]:
    """A layer's readings with the unit shares derived, NaN where the outputs were NaN/Inf."""
    metrics = dict(reading.metrics)
    if reading.dead_units is not None and reading.units:
        metrics["dead_fraction"] = reading.dead_units / reading.units
    if reading.dormant_units is not None and reading.units:
        metrics["dormant_fraction"] = reading.dormant_units / reading.units
    if reading.alive_fraction is not None:
        metrics["alive_fraction"] = reading.alive_fraction
    if reading.collapsed_fraction is not None:
        metrics["collapsed_fraction"] = reading.collapsed_fraction
    if metrics and metrics.get("nonfinite", 0) > 0:  # NaN/Inf outputs: no unit is measurably dead, alive or constant
        for key in UNIT_FRACTIONS:
            if key in metrics or key == "dead_fraction":
                metrics[key] = math.nan
    return metrics


class Record:
    """Curves, findings and the rules' memory of one run (see the module docstring).

    Args:
        thresholds: when readings become findings.
        max_points: points kept per curve (see :class:`~lightning_health.pipeline.history.History`).
        window: the dead-unit window in sampled batches (also the update-ratio window).
    """

    def __init__(self, thresholds: Thresholds, max_points: int, window: int) -> None:
        self.thresholds = thresholds
        self.window = window
        self.history = History(max_points)
        self.findings = FindingLog()
        self.grad_baseline = GradBaseline(thresholds.baseline_samples)  # scale-free explosion rule
        self.gain_baseline = GradBaseline(thresholds.baseline_samples, "grad_gain")  # gradient_flow: what changed
        self.last_units: dict[str, tuple[int | None, int]] = {}
        self.update_window = UpdateWindow(window)
        self.layers: list[str] = []
        self.rectifiers: set[str] = set()  # hard-zero side: the `dead` rule
        self.smooth: set[str] = set()  # smooth off side: the `inactive` rule
        self.heads: set[str] = set()  # the model's output: not saturated, no gradient reference (capture/heads.py)

    def bind(self, chosen: Sequence[MonitoredLayer]) -> None:
        """The layers of a new fit and what each activation can do."""
        if not self.findings.findings():
            self.findings = FindingLog([layer.name for layer in chosen])
        self.layers = [layer.name for layer in chosen]
        self.heads = set()  # found again from this fit's first sampled loss
        self.rectifiers = {layer.name for layer in chosen if layer.profile.can_die}
        self.smooth = {layer.name for layer in chosen if layer.profile.off_side == "smooth"}

    def drop(self, names: Sequence[str]) -> None:
        """Forget layers that will not be read (never ran, or swapped to an activation that cannot die)."""
        self.layers = [name for name in self.layers if name not in names]
        self.rectifiers -= set(names)
        self.smooth -= set(names)

    def restore(self, names: Sequence[str], layers: Sequence[MonitoredLayer]) -> None:
        """Take back layers that were set aside but ran after all, in the capture's order."""
        back = set(names)
        self.layers = [layer.name for layer in layers if layer.name in back or layer.name in self.layers]
        self.rectifiers |= {layer.name for layer in layers if layer.name in back and layer.profile.can_die}
        self.smooth |= {layer.name for layer in layers if layer.name in back and layer.profile.off_side == "smooth"}

    def add(self, step: int, values: Mapping[str, Mapping[str, float]], scalars: dict[str, float]) -> None:
        """Log ``{metric: {layer: value}}`` as ``health/<metric>/<layer>`` and add it to the curves."""
        for metric, by_layer in values.items():
            for name, value in by_layer.items():
                scalars[f"health/{metric}/{name}" if name else f"health/{metric}"] = value
                self.history.add(step, metric, name, value)

    def tabulate(
        self, step: int, readings: list[LayerReading], capture: Capture, host_edges: Mapping[str, tuple[float, ...]]
    ) -> tuple[dict[str, float], dict[str, Histogram], Snapshot]:
        """Readings -> logged scalars, histograms, and the snapshot the diagnosis reads."""
        scalars: dict[str, float] = {}
        histograms: dict[str, Histogram] = {}
        snapshot: Snapshot = {}
        for layer, reading in zip(capture.layers, readings):
            metrics = layer_metrics(reading)
            if not metrics:
                continue
            if reading.dead_units is not None and reading.units:
                self.last_units[layer.name] = (reading.dead_units, reading.units)
            self.add(step, {metric: {layer.name: value} for metric, value in metrics.items()}, scalars)
            snapshot[layer.name] = dict(metrics)
            if reading.dead_units is not None:
                snapshot[layer.name].update(dead_units=reading.dead_units, units=reading.units)
                if reading.values_per_unit is not None:  # for the rules only, not logged
                    snapshot[layer.name]["values_per_unit"] = reading.values_per_unit
            if reading.act_hist is not None:
                edges = host_edges[f"act:{layer.name}"]
                histograms[f"health/activations/{layer.name}"] = Histogram(edges, tuple(reading.act_hist))
            if reading.grad_hist is not None:
                histograms[f"health/gradients/{layer.name}"] = Histogram(host_edges["grad"], tuple(reading.grad_hist))
        return scalars, histograms, snapshot

    def learning(
        self,
        step: int,
        readings: dict[str, dict[str, float]],
        grad_norms: Sequence[tuple[str, float]],
        snapshot: Snapshot,
        order: Sequence[str],
        skipped: bool,
        scalars: dict[str, float],
    ) -> None:
        """Parameter-gradient norms, update ratios and the depth profile: logged and added to ``snapshot``."""
        self.add(step, {"param_grad_norm": dict(grad_norms)} if grad_norms else {}, scalars)
        learned = fold_learning(readings, list(grad_norms), self.update_window, snapshot, order, skipped, step)
        self.add(step, learned, scalars)

    @staticmethod
    def skip_gradients(snapshot: Snapshot, scalars: dict[str, float]) -> None:
        """The loss scale overflowed and the scaler skips this step: infinite gradients are AMP working
        as designed. Log it, and keep the gradient readings out of this step's diagnosis."""
        scalars["health/amp_skipped_step"] = 1.0
        for row in snapshot.values():
            for key in GRADIENT_READINGS:
                row.pop(key, None)

    def diagnose(self, step: int, snapshot: Snapshot, order: Sequence[str]) -> list[Finding]:
        """Run the rules over a training step; the findings that escalated."""
        with_grad = [name for name in order if "grad_std" in snapshot.get(name, {})]
        inner = [name for name in with_grad if name not in self.heads] or with_grad
        found, checked = evaluate(
            step,
            snapshot,
            self.thresholds,
            rectifiers=self.rectifiers,
            output_layer=inner[-1] if inner else None,
            window=self.window,
            smooth_rectifiers=self.smooth,
            layer_order=order,
            baseline=self.grad_baseline,
            gain_baseline=self.gain_baseline,
            heads=self.heads,
        )
        return self.findings.record(found, checked, step)

    def validation(
        self, step: int, layers: Sequence[MonitoredLayer], results: Sequence[tuple[int, int]]
    ) -> tuple[dict[str, float], list[Finding]]:
        """A whole validation pass's dead units per layer: the scalars to log and the findings that escalated."""
        scalars: dict[str, float] = {}
        snapshot: Snapshot = {}
        for layer, (dead, units) in zip(layers, results):
            if not units:  # not observed in this pass: not judged
                continue
            nonfinite = self.history.latest(layer.name).get("nonfinite")
            value = math.nan if nonfinite else dead / units  # a NaN layer's silence is not death
            self.add(step, {"val_dead_fraction": {layer.name: value}}, scalars)
            snapshot[layer.name] = {"val_dead_fraction": value, "dead_units": dead, "units": units}
            if nonfinite:
                snapshot[layer.name]["nonfinite"] = nonfinite
        found, checked = evaluate(
            step, snapshot, self.thresholds, rectifiers=self.rectifiers, smooth_rectifiers=self.smooth
        )
        return scalars, self.findings.record(found, checked, step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history.state_dict(),
            "findings": self.findings.state_dict(),
            "grad_baseline": self.grad_baseline.state_dict(),
            "gain_baseline": self.gain_baseline.state_dict(),
            "last_units": {k: list(v) for k, v in self.last_units.items()},
            "layers": list(self.layers),
            "update_window": self.update_window.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history.load_state_dict(state.get("history", {}))
        self.findings.load_state_dict(state.get("findings", []))
        self.grad_baseline.load_state_dict(state.get("grad_baseline", {}))
        self.gain_baseline.load_state_dict(state.get("gain_baseline", {}))
        self.last_units = {k: (v[0], v[1]) for k, v in state.get("last_units", {}).items()}
        self.layers = self.layers or list(state.get("layers", []))
        self.update_window.load_state_dict(state.get("update_window", {}))
