"""The rules, their thresholds, and the order in which problems are reported."""

from __future__ import annotations

import pytest

from lightning_health import Finding, Thresholds, diagnose_curves
from lightning_health.diagnosis import FindingLog, evaluate


def _kinds(findings):
    return {(f.layer, f.kind, f.severity) for f in findings}


def test_default_thresholds():
    t = Thresholds()
    assert (t.dead_warning, t.dead_critical, t.saturation) == (0.2, 0.5, 0.5)
    # Scale-free by default: the absolute gradient thresholds are opt-in.
    assert (t.vanishing_grad_std, t.exploding_grad_std, t.exploding_growth) == (None, None, 100.0)
    assert (t.collapsed, t.collapse_unit_ratio, t.collapse_std) == (0.5, 1e-3, 1e-3)


def test_each_rule_fires_at_its_threshold():
    readings = {
        "a": {"dead_fraction": 0.25, "act_std": 1.0, "grad_std": 1e-2, "saturation": 0.0, "nonfinite": 0},
        "b": {"dead_fraction": 0.6, "act_std": 1e-4, "grad_std": 20.0, "saturation": 0.6, "nonfinite": 0},
        "c": {"nonfinite": 3, "grad_nonfinite": 1},
        "out": {"act_std": 1.0, "grad_std": 1e-2},
    }
    found, _ = evaluate(7, readings, Thresholds(exploding_grad_std=10.0), output_layer="out")
    assert _kinds(found) == {
        ("a", "dead", "warning"),
        ("b", "dead", "critical"),
        ("b", "collapsed", "warning"),
        ("b", "exploding_gradient", "critical"),
        ("b", "saturated", "warning"),
        ("c", "nonfinite", "critical"),
    }
    assert all(f.step == 7 and f.hint for f in found)


def test_vanishing_is_relative_so_a_converged_network_is_healthy():
    # Converged: every gradient tiny, but all of the same size => healthy.
    converged = {"h1": {"grad_std": 3e-6}, "h2": {"grad_std": 2e-6}, "out": {"grad_std": 4e-6}}
    found, _ = evaluate(0, converged, Thresholds(), output_layer="out")
    assert found == []
    # Vanishing: the early layer gets 1/1000 of what reaches the output side.
    vanishing = {"h1": {"grad_std": 1e-6}, "out": {"grad_std": 1e-3}}
    found, _ = evaluate(0, vanishing, Thresholds(), output_layer="out")
    assert _kinds(found) == {("h1", "vanishing_gradient", "warning")}


def test_a_head_is_output_side_of_the_vanishing_reference():
    # The reference is the last layer before the heads; a head below it (large head weights) is gain.
    readings = {"h1": {"grad_norm": 1e-5, "grad_std": 1e-6}, "inner": {"grad_norm": 10.0, "grad_std": 1.0},
                "head": {"grad_norm": 1e-3, "grad_std": 1e-4}}  # fmt: skip
    found, _ = evaluate(0, readings, Thresholds(), output_layer="inner", heads={"head"})
    assert _kinds(found) == {("h1", "vanishing_gradient", "warning")}


def test_dead_rule_only_for_rectifiers():
    found, _ = evaluate(0, {"tanh": {"dead_fraction": 0.9}}, Thresholds(), rectifiers={"relu"})
    assert found == []


def test_nan_readings_neither_raise_nor_clear_rules():
    log = FindingLog(["a"])
    t = Thresholds(exploding_grad_std=10.0)
    found, checked = evaluate(1, {"a": {"grad_std": 50.0}}, t)
    log.record(found, checked, 1)
    found, checked = evaluate(2, {"a": {"grad_std": float("nan"), "grad_nonfinite": 4}}, t)
    log.record(found, checked, 2)
    kinds = {(f.kind, f.active) for f in log.findings()}
    assert kinds == {("exploding_gradient", True), ("nonfinite", True)}


def test_onsets_are_kept_in_the_order_problems_appeared():
    curves = {
        "dead_fraction": {"net.3": [(2, 0.0), (4, 0.7), (5, 0.7)]},
        "nonfinite": {"net.3": [(2, 0), (4, 0), (5, 12)]},
        "act_std": {"net.3": [(2, 1.0), (4, 1.0), (5, 1.0)]},
    }
    findings = diagnose_curves(curves)
    assert [(f.kind, f.step) for f in findings] == [("dead", 4), ("nonfinite", 5)]
    assert isinstance(findings[0], Finding) and findings[0].severity == "critical"


def test_resolved_findings_stay_in_the_record():
    curves = {"dead_fraction": {"l": [(0, 0.3), (10, 0.0)]}}
    (f,) = diagnose_curves(curves)
    assert f.kind == "dead" and f.step == 0 and not f.active
    # seen at step 0, gone at step 10: "cleared by step 0" read as if it never lasted
    assert str(f).endswith("(since step 0) (cleared after step 0)")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dead_warning": 1.5}, "dead_warning"),
        ({"saturation": -0.1}, "saturation"),
        ({"exploding_grad_std": 0}, "exploding_grad_std"),
        ({"dead_warning": 0.6, "dead_critical": 0.5}, "dead_critical"),
        ({"collapse_std": "small"}, "collapse_std"),
    ],
)
def test_bad_thresholds_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Thresholds(**kwargs)


def test_a_layer_that_turns_nan_keeps_its_dead_finding_open():
    curves = {
        "dead_fraction": {"l": [(2, 0.6), (3, 0.0)]},
        "nonfinite": {"l": [(2, 0), (3, 256)]},
    }
    findings = {f.kind: f for f in diagnose_curves(curves)}
    assert findings["dead"].active and findings["dead"].step == 2
    assert findings["nonfinite"].step == 3


def test_a_validation_only_step_does_not_clear_a_nan_layers_dead_finding():
    # the last validation pass lands on a step with no training reading (step 10 here)
    curves = {
        "dead_fraction": {"l": [(2, 0.6), (3, 0.0)]},
        "nonfinite": {"l": [(2, 0), (3, 256)]},
        "val_dead_fraction": {"l": [(10, 0.0)]},
    }
    dead = next(f for f in diagnose_curves(curves) if f.kind == "dead")
    assert dead.active and dead.step == 2


def test_one_sharp_head_is_learning_a_one_hot_layer_is_a_finding():
    """entropy_collapse reads the layer's mean over heads: a copy or sink head at 0.02 nats beside heads
    at 2 nats is what training builds; logit_growth is a level (the bound), not growth from ~0 at init."""
    t = Thresholds()
    learned = {"attn": {"attn_entropy": 1.5, "attn_entropy_min": 0.02, "attn_logit_max": 30.0,
                        "attn_logit_max_low": 0.1}}  # fmt: skip
    found, _ = evaluate(10, learned, t)
    assert not _kinds(found)
    collapsed = {"attn": {"attn_entropy": 0.03, "attn_entropy_min": 0.0, "attn_logit_max": 400.0,
                          "attn_logit_max_low": 0.1}}  # fmt: skip
    found, _ = evaluate(10, collapsed, t)
    assert {f.kind for f in found} == {"entropy_collapse", "logit_growth"}
    assert "4000x its lowest reading" in next(f.message for f in found if f.kind == "logit_growth")


def test_exploding_is_sustained_growth_past_the_usual_level_and_a_gate_opening_is_not_vanishing():
    from lightning_health.diagnosis import GradBaseline

    t = Thresholds()

    def run(curve, layer="a", out=None):
        baseline, kinds = GradBaseline(t.baseline_samples), []
        for step, g in enumerate(curve):
            readings = {layer: {"grad_std": g, "grad_norm": g}}
            if out is not None:
                readings["out"] = {"grad_std": out, "grad_norm": out}
            found, _ = evaluate(step, readings, t, baseline=baseline, output_layer="out" if out else None)
            kinds.append({f.kind for f in found if f.layer == layer})
        return kinds

    spike = run([1e-3] * 10 + [0.2] + [1e-3] * 5)  # one batch 200x: a spike, not an explosion
    assert not any(spike)
    sustained = run([1e-3] * 10 + [0.2, 0.2])
    assert sustained[-2:] == [set(), {"exploding_gradient"}]
    assert run([1e-3, 1e-3, 20.0])[-1] == {"exploding_gradient"}  # 2e4x at once needs no second reading
    # exactly 0 at the first reading: a gate initialised at 0; small while it opens is by design ...
    opening = run([0.0, 1e-5, 1e-4, 5e-3, 1e-2, 1e-2], out=1e-2)
    assert not any(opening)
    # ... but once open, falling back below 1/100 of the output side is vanishing
    assert run([0.0, 1e-5, 1e-2, 1e-5], out=1e-2)[-1] == {"vanishing_gradient"}
    assert run([1e-6, 1e-6], out=1e-2)[0] == {"vanishing_gradient"}  # small, not 0, at init: judged at once


def test_a_checkpoint_of_the_first_readings_baseline_still_loads():
    """Checkpoints written before the usual levels hold ``{layer: [first readings]}``."""
    from lightning_health.diagnosis import GradBaseline

    restored = GradBaseline()
    restored.load_state_dict({"a": [1.0, 2.0, 3.0]})
    assert restored.get("a") == 2.0
    restored.observe({"a": {"grad_std": 5.0}})
    restored.observe({"a": {"grad_std": 7.0}})  # 5.0 joins the earlier readings, 7.0 is the latest
    assert restored.get("a") == 2.5 and restored.previous("a") == 5.0
    again = GradBaseline()
    again.load_state_dict(restored.state_dict())
    assert again.state_dict() == restored.state_dict() and again.get("a") == 2.5


def test_the_usual_level_keeps_a_bounded_uniform_sample_of_a_long_run():
    from lightning_health.diagnosis import GradBaseline
    from lightning_health.diagnosis.baseline import KEEP

    b = GradBaseline()
    for step in range(1, 5001):
        b.observe({"a": {"grad_std": float(step)}})
    kept = b.state_dict()["seen"]["a"]
    assert len(kept) <= KEEP + 1
    assert abs(b.get("a") - 2500) < 100  # the median of readings 1..4999, from the thinned sample
