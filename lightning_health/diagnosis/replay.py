"""Replay the rules over logged curves: how a finished run is diagnosed from its event files."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from lightning_health.diagnosis.baseline import GradBaseline
from lightning_health.diagnosis.findings import Finding, FindingLog
from lightning_health.diagnosis.rules import evaluate
from lightning_health.diagnosis.thresholds import Thresholds


def diagnose_curves(
    curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    thresholds: Thresholds | None = None,
    *,
    rectifiers: Iterable[str] | None = None,
    layer_order: Sequence[str] | None = None,
) -> list[Finding]:
    """Replay the rules over logged curves ``{metric: {layer: [(step, value), ...]}}``.

    This is how ``lightning-health report`` diagnoses a finished run from its TensorBoard files.
    The output-side layer is the last one in ``layer_order`` (or in the order layers appear). The
    early-run gradient baselines are rebuilt from the curves in step order, exactly as the live
    monitor builds them, so the report gives the same verdicts as the run did.
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
    log = FindingLog(order)
    baseline = GradBaseline(thresholds.baseline_samples)
    gains = GradBaseline(thresholds.baseline_samples, "grad_gain")
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
        with_grad = [name for name in order if "grad_std" in snapshot.get(name, {})]
        if with_grad:
            output = with_grad[-1]
        found, checked = evaluate(
            step, snapshot, thresholds, rectifiers=rectifiers, output_layer=output, baseline=baseline,
            layer_order=order, gain_baseline=gains,
        )  # fmt: skip
        log.record(found, checked, step)
    return log.findings()
