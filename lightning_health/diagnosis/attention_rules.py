"""Rules on transformer health: attention entropy, attention-logit growth, residual-stream outliers.

See :mod:`lightning_health.diagnosis.rules` for what each rule says, its default and its source.
"""

from __future__ import annotations

from collections.abc import Mapping

from lightning_health.diagnosis.context import Context, Hit, pct


def entropy_rule(layer: str, r: Mapping[str, float], ctx: Context) -> tuple[set[str], list[Hit]]:
    low = r.get("attn_entropy_min")
    if low is None:
        return set(), []
    t, peak = ctx.thresholds, r.get("attn_entropy_min_peak")
    if low < t.entropy_floor:
        return {"entropy_collapse"}, [
            ("entropy_collapse", "warning", f"lowest head's attention entropy {low:.3f} nats: nearly one-hot", low)
        ]
    if peak is not None and low < t.entropy_drop * peak:
        message = f"lowest head's attention entropy {low:.3f} nats, down from {peak:.3f}"
        return {"entropy_collapse"}, [("entropy_collapse", "warning", message, low)]
    return {"entropy_collapse"}, []


def logit_rule(layer: str, r: Mapping[str, float], ctx: Context) -> tuple[set[str], list[Hit]]:
    top = r.get("attn_logit_max")
    if top is None:
        return set(), []
    t, low = ctx.thresholds, r.get("attn_logit_max_low")
    if top > t.logit_bound:
        return {"logit_growth"}, [
            ("logit_growth", "warning", f"max attention logit {top:.1f} above {t.logit_bound:g}", top)
        ]
    if low is not None and low > 0 and top >= t.logit_growth_floor and top >= t.logit_growth * low:
        message = f"max attention logit {top:.1f}, {top / low:.1f}x its lowest reading ({low:.2f})"
        return {"logit_growth"}, [("logit_growth", "warning", message, top)]
    return {"logit_growth"}, []


def massive_rule(layer: str, r: Mapping[str, float], ctx: Context) -> tuple[set[str], list[Hit]]:
    ratio = r.get("massive_ratio")
    if ratio is None:
        return set(), []
    low = r.get("massive_ratio_low")
    if ratio >= 100 and low is not None and low > 0 and ratio >= ctx.thresholds.massive_growth * low:
        share = r.get("massive_channels", 0.0)
        message = (
            f"residual-stream outliers growing: max/median {ratio:.0f} ({ratio / low:.1f}x its lowest), "
            f"{pct(share)} of channels past 100x the median"
        )
        return {"massive_activation"}, [("massive_activation", "warning", message, ratio)]
    return {"massive_activation"}, []
