"""Replay the rules over logged curves: how a finished run is diagnosed from its event files."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from lightning_health.diagnosis.baseline import GradBaseline
from lightning_health.diagnosis.context import GRADIENT_READINGS
from lightning_health.diagnosis.findings import Finding, FindingLog
from lightning_health.diagnosis.learning import UpdateWindow
from lightning_health.diagnosis.rules import evaluate
from lightning_health.diagnosis.thresholds import Thresholds

#: The update-ratio window when the run's ``dead_window`` is not known (``HealthMonitor``'s default).
DEFAULT_WINDOW = 4
# The readings that make a layer one of the depth profile's (a monitored layer, not a parameter group).
_PROFILE_READINGS = ("act_rms", "grad_norm", "act_gain", "grad_gain")


def diagnose_curves(
    curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    thresholds: Thresholds | None = None,
    *,
    rectifiers: Iterable[str] | None = None,
    layer_order: Sequence[str] | None = None,
    window: int | None = None,
    skipped_steps: Iterable[int] = (),
) -> list[Finding]:
    """Replay the rules over logged curves ``{metric: {layer: [(step, value), ...]}}``.

    This is how ``lightning-health report`` diagnoses a finished run from its TensorBoard files.
    The output-side layer is the last one in ``layer_order`` (or in the order layers appear). The
    usual gradient levels and each module's window of update ratios (``stalled``,
    ``unstable``) are rebuilt from the curves in step order, exactly as the live monitor builds
    them, so the report gives the same verdicts as the run did. ``gradient_flow`` reads the logged
    ``grad_gain``; its message names the previous monitored layer in ``layer_order``.

    Args:
        curves: the logged readings; ``update_ratio`` and ``param_grad_norm`` feed the update window.
        thresholds: the rule thresholds (default: :class:`Thresholds`).
        rectifiers: layers the ``dead`` rule applies to; ``None``: every layer.
        layer_order: the layers in forward order (the order of the findings and of the depth profile).
        window: the run's ``dead_window``: the update-ratio window, also named in the messages;
            ``None``: :data:`DEFAULT_WINDOW` for the update window, and messages say "the window".
        skipped_steps: steps whose optimizer step the GradScaler skipped (``health/amp_skipped_step``):
            their update ratios are not judged and their gradient readings are left out, as live.
    """
    thresholds = thresholds or Thresholds()
    by_step: dict[int, dict[str, dict[str, float]]] = {}
    order: list[str] = list(layer_order or [])
    for metric, per_layer in curves.items():
        for layer, points in per_layer.items():
            if layer not in order:
                order.append(layer)
            for step, value in points:
                by_step.setdefault(int(step), {}).setdefault(layer, {})[metric] = float(value)
    profiled = {layer for metric in _PROFILE_READINGS for layer in curves.get(metric, {})}
    depth_order = [layer for layer in order if layer in profiled]
    skipped = {int(step) for step in skipped_steps}
    log = FindingLog(order)
    baseline = GradBaseline(thresholds.baseline_samples)
    gains = GradBaseline(thresholds.baseline_samples, "grad_gain")
    updates = UpdateWindow(window or DEFAULT_WINDOW)
    output = None
    latest_nonfinite: dict[str, float] = {}
    for step in sorted(by_step):
        snapshot = by_step[step]
        for layer, readings in snapshot.items():
            # A validation-only step carries no training reading: judge it with the layer's latest
            # non-finite count, as the live monitor does, so a NaN layer's dead finding stays open.
            if "nonfinite" in readings:
                latest_nonfinite[layer] = readings["nonfinite"]
            elif latest_nonfinite.get(layer):
                readings["nonfinite"] = latest_nonfinite[layer]
            if step in skipped:
                for key in GRADIENT_READINGS:
                    readings.pop(key, None)
        learning = {layer: r for layer, r in snapshot.items() if "update_ratio" in r}
        for layer, stats in updates.add(learning, skipped=step in skipped, step=step).items():
            snapshot[layer].update(stats)
        with_grad = [name for name in order if "grad_std" in snapshot.get(name, {})]
        if with_grad:
            output = with_grad[-1]
        found, checked = evaluate(
            step,
            snapshot,
            thresholds,
            rectifiers=rectifiers,
            output_layer=output,
            window=window,
            layer_order=depth_order,
            baseline=baseline,
            gain_baseline=gains,
        )
        log.record(found, checked, step)
    return log.findings()
