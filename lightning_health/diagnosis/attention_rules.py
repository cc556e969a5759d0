"""Rules on transformer health: attention entropy, attention-logit growth, residual-stream outliers.

See :mod:`lightning_health.diagnosis.rules` for what each rule says, its default and its source.
"""

from __future__ import annotations

from collections.abc import Mapping

from lightning_health.diagnosis.context import Context, Hit, pct


def entropy_rule(layer: str, r: Mapping[str, float], ctx: Context) -> tuple[set[str], list[Hit]]:
    """The layer's mean attention entropy (over heads and queries) near zero: the whole layer attends one-hot.

    Judged on the mean, not the lowest head: a single near-one-hot head (an attention sink, a
    previous-token or copy head) is what training builds, while the collapse that precedes
    instability takes the layer (Zhai et al., 2023). Nor is a drop from the first readings a
    finding: at initialisation attention is uniform, its highest entropy, and learning lowers it.
    """
    mean = r.get("attn_entropy")
    if mean is None:
        return set(), []
    floor = ctx.thresholds.entropy_floor
    if mean < floor:
        message = f"mean attention entropy {mean:.3f} nats across the layer's heads (below {floor:g}): nearly one-hot"
        return {"entropy_collapse"}, [("entropy_collapse", "warning", message, mean)]
    return {"entropy_collapse"}, []


def logit_rule(layer: str, r: Mapping[str, float], ctx: Context) -> tuple[set[str], list[Hit]]:
    """The largest attention logit past ``logit_bound``, with how far it grew from its lowest reading.

    A level, not a growth factor: from a small initialisation the logits start near 0 and grow tens of
    times while attention learns to focus (to 10-30 in healthy runs), so any growth rule that starts
    from the first readings calls learning a finding.
    """
    top = r.get("attn_logit_max")
    if top is None:
        return set(), []
    bound, low = ctx.thresholds.logit_bound, r.get("attn_logit_max_low")
    if top > bound:
        grown = f", {top / low:.0f}x its lowest reading ({low:.2f})" if low is not None and low > 0 else ""
        message = f"max attention logit {top:.1f} above {bound:g}{grown}"
        return {"logit_growth"}, [("logit_growth", "warning", message, top)]
    return {"logit_growth"}, []


def massive_rule(layer: str, r: Mapping[str, float], ctx: Context) -> tuple[set[str], list[Hit]]:
    """A block's max/median past 100 and ``massive_growth`` times its lowest of the last few readings.

    Existence is not a finding (Sun et al., 2024: every trained LLM has them), nor is a slow build-up
    over a long run; a jump within :data:`~lightning_health.pipeline.transformer_step.MASSIVE_RECENT`
    sampled steps is.
    """
    ratio = r.get("massive_ratio")
    if ratio is None:
        return set(), []
    low = r.get("massive_ratio_low")
    if ratio >= 100 and low is not None and low > 0 and ratio >= ctx.thresholds.massive_growth * low:
        share = r.get("massive_channels", 0.0)
        message = (
            f"residual-stream outliers growing: max/median {ratio:.0f} ({ratio / low:.1f}x its lowest of late), "
            f"{pct(share)} of channels past 100x the median"
        )
        return {"massive_activation"}, [("massive_activation", "warning", message, ratio)]
    return {"massive_activation"}, []
