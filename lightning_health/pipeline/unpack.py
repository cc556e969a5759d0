"""From the one host list of a sampled step to one :class:`LayerReading` per layer.

The host list is the synced packed vector (:mod:`lightning_health.pipeline.packing`) followed by
the per-layer counts computed on the device after the sync (:mod:`lightning_health.pipeline.batched`),
block by block: dead units per window, dormant units per dormancy window, units fired per reported
slot, ``[collapsed, measured]`` per layer with moments, then whatever the caller appended.
"""

from __future__ import annotations

import dataclasses

from lightning_health.pipeline.packing import LayerPlan
from lightning_health.readings import reductions as R


@dataclasses.dataclass
class LayerReading:
    """One layer's numbers at one sampled step, on the host."""

    metrics: dict[str, float]
    act_hist: list[float] | None = None
    grad_hist: list[float] | None = None
    dead_units: int | None = None  # None until the window holds enough evidence
    units: int = 0
    dormant_units: int | None = None  # tau-dormant over the window; None until full, or untracked
    alive_fraction: float | None = None  # share of units that fired on this sampled step (any rank)
    collapsed_fraction: float | None = None  # share of live units constant across this step's batch (collapse.py)
    values_per_unit: float | None = None  # this step's outputs per unit (examples x positions): dead's evidence


def _slice(host: list[float], span: tuple[int, int] | None) -> list[float] | None:
    return None if span is None else host[span[0] : span[0] + span[1]]


class _Blocks:
    """Read cursors into the count blocks that follow the synced vector."""

    def __init__(self, host: list[float], start: int, sizes: tuple[int, int, int]) -> None:
        self.host = host
        self.at = {"dead": start, "dormant": start + sizes[0], "alive": start + sizes[0] + sizes[1]}
        self.at["collapse"] = self.at["alive"] + sizes[2]

    def take(self, block: str, n: int) -> list[float]:
        at = self.at[block]
        self.at[block] = at + n
        return self.host[at : at + n]


def to_readings(
    host: list[float], plan: list[LayerPlan], start: int, sizes: tuple[int, int, int], collapse: bool
) -> tuple[list[LayerReading], int]:
    """The readings of every layer in ``plan``, and where the caller's appended numbers begin.

    Args:
        host: the step's host list.
        plan: where each layer's numbers sit.
        start: where the count blocks begin (the length of the synced vector).
        sizes: the lengths of the dead, dormant and alive blocks.
        collapse: whether a ``[collapsed, measured]`` row follows for each layer with moments.
    """
    blocks = _Blocks(host, start, sizes)
    readings = []
    for entry in plan:
        act_host = host[entry.base : entry.base + R.ACTIVATION_WIDTH]
        grad_host = host[entry.base + R.ACTIVATION_WIDTH : entry.base + R.ACTIVATION_WIDTH + R.GRADIENT_WIDTH]
        dead = int(sum(blocks.take("dead", len(entry.windows))))
        units = sum(width for width, _full in entry.windows)
        dormant: int | None = int(sum(blocks.take("dormant", len(entry.dormant))))
        if not entry.dormant or not all(entry.dormant) or len(entry.dormant) != len(entry.windows):
            dormant = None
        fired = blocks.take("alive", entry.alive_slots)
        alive = sum(fired) / entry.alive_width if entry.alive_width else None
        collapsed = None
        if entry.moment_slots and collapse:
            count, measured = blocks.take("collapse", 2)
            collapsed = count / measured if measured > 0 else None
        complete = bool(entry.windows) and all(full for _w, full in entry.windows)
        if act_host[R.A_COUNT] <= 0:  # not read on any rank this step: no unit reading (not observed, not dead)
            complete, alive, collapsed = False, None, None
        readings.append(
            LayerReading(
                metrics={**R.derive_activation(act_host), **R.derive_gradient(grad_host)},
                act_hist=_slice(host, entry.act_hist) if act_host[R.A_COUNT] > 0 else None,
                grad_hist=_slice(host, entry.grad_hist) if grad_host[R.G_COUNT] > 0 else None,
                dead_units=dead if complete else None,
                units=units,
                dormant_units=dormant if complete else None,
                alive_fraction=alive,
                collapsed_fraction=collapsed,
                values_per_unit=act_host[R.A_COUNT] / units if units and act_host[R.A_COUNT] > 0 else None,
            )
        )
    return readings, blocks.at["collapse"]
