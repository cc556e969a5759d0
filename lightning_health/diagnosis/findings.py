"""Findings and their log: what is wrong in which layer, since when, how it stands now, and its worst.

:class:`FindingLog` keeps, for every (layer, kind), the step it first appeared (its onset), its
latest state and its peak (the worst state seen), so a layer that died at step 4 and went NaN at
step 5 reports both, in that order, and a layer that reached 57% dead before recovering to 32%
still says it was critical once.

"Worse" is a higher severity first, then a value further in the kind's bad direction
(:data:`WORSE_WHEN`): more dead units is worse, a smaller gradient ratio is a worse vanishing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Literal

Severity = Literal["warning", "critical"]
KINDS = (
    "nonfinite", "dead", "exploding_gradient", "vanishing_gradient", "saturated", "collapsed", "inactive",
    "gradient_flow", "stalled", "unstable", "entropy_collapse", "logit_growth", "massive_activation",
)  # fmt: skip
WORSE_WHEN: dict[str, int] = {"vanishing_gradient": -1}
"""Per kind, +1 when a larger value is worse (the default), -1 when a smaller one is."""
_RANK = {"warning": 0, "critical": 1}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem in one layer.

    Attributes:
        layer: the module's qualified name.
        kind: one of ``dead``, ``inactive``, ``saturated``, ``vanishing_gradient``,
            ``exploding_gradient``, ``collapsed``, ``nonfinite``, ``gradient_flow``, ``stalled``, ``unstable``,
            ``entropy_collapse``, ``logit_growth``, ``massive_activation``.
        severity: ``"warning"`` or ``"critical"``.
        message: what is wrong, in plain English, with the numbers.
        step: the global step at which this problem first appeared (its onset).
        hint: what to try.
        value: the reading that tripped the rule, at the latest evaluation.
        last_step: the latest step at which the problem was seen.
        active: False once the latest readings no longer show the problem.
        peak_severity: the worst severity seen (``None`` in a finding not yet recorded: its own).
        peak_value: the reading at the worst moment.
        peak_step: the step of the worst moment (``-1``: not recorded yet).
        peak_message: the message at the worst moment.
    """

    layer: str
    kind: str
    severity: Severity
    message: str
    step: int
    hint: str
    value: float = math.nan
    last_step: int = -1
    active: bool = True
    peak_severity: Severity | None = None
    peak_value: float = math.nan
    peak_step: int = -1
    peak_message: str = ""

    @property
    def peaked_earlier(self) -> bool:
        """True when the worst moment is not the latest one (then both are worth showing)."""
        return self.peak_step >= 0 and self.peak_step != self.last_step and self.peak_message != self.message

    def __str__(self) -> str:
        state = "" if self.active else f" (cleared after step {self.last_step})"  # its last reading showing it
        peak = f"; worst: [{self.peak_severity}] {self.peak_message} at step {self.peak_step}"
        peak = peak if self.peaked_earlier else ""
        return f"[{self.severity}] {self.layer}: {self.message} (since step {self.step}{peak}){state}"


def _worse(kind: str, severity: str, value: float, than: Finding) -> bool:
    """Is (severity, value) worse than ``than``'s peak?"""
    old_rank = _RANK.get(str(than.peak_severity or than.severity), 0)
    rank = _RANK.get(severity, 0)
    if rank != old_rank:
        return rank > old_rank
    old = than.peak_value
    if math.isnan(value):
        return False
    return math.isnan(old) or WORSE_WHEN.get(kind, 1) * (value - old) > 0


class FindingLog:
    """Every problem of the run: its onset step and its latest state, in the order they happened."""

    def __init__(self, layer_order: Sequence[str] = ()) -> None:
        self._order = {name: i for i, name in enumerate(layer_order)}
        self._entries: dict[tuple[str, str], Finding] = {}

    def record(self, findings: Sequence[Finding], checked: set[tuple[str, str]], step: int) -> list[Finding]:
        """Fold one evaluation in. Returns findings that are new or newly critical at this step."""
        escalated = []
        present = {(f.layer, f.kind) for f in findings}
        for f in findings:
            key = (f.layer, f.kind)
            old = self._entries.get(key)
            onset = f.step if old is None else old.step
            if old is None or _worse(f.kind, f.severity, f.value, old):
                worst: tuple[Severity | None, float, int, str] = f.severity, f.value, step, f.message
            else:
                worst = old.peak_severity, old.peak_value, old.peak_step, old.peak_message
            self._entries[key] = dataclasses.replace(
                f, step=onset, last_step=step, active=True,
                peak_severity=worst[0], peak_value=worst[1], peak_step=worst[2], peak_message=worst[3],
            )  # fmt: skip
            if old is None or (f.severity == "critical" and (old.severity != "critical" or not old.active)):
                escalated.append(self._entries[key])
        for key in checked - present:
            old = self._entries.get(key)
            if old is not None and old.active:
                self._entries[key] = dataclasses.replace(old, active=False)
        return escalated

    def findings(self) -> list[Finding]:
        """All findings sorted by onset, then by the layer's position, then by kind."""
        return sorted(
            self._entries.values(),
            key=lambda f: (f.step, self._order.get(f.layer, len(self._order)), KINDS.index(f.kind)),
        )

    def state_dict(self) -> list[dict[str, object]]:
        return [dataclasses.asdict(f) for f in self._entries.values()]

    def load_state_dict(self, state: Sequence[Mapping[str, object]]) -> None:
        fields = {f.name for f in dataclasses.fields(Finding)}
        for item in state:
            f = Finding(**{k: v for k, v in item.items() if k in fields})  # type: ignore[arg-type]
            if f.peak_step < 0:  # a checkpoint from before peaks were kept: its latest state is all it knows
                f = dataclasses.replace(
                    f, peak_severity=f.severity, peak_value=f.value, peak_step=f.last_step, peak_message=f.message
                )
            self._entries[(f.layer, f.kind)] = f
