"""Findings and their log: what is wrong in which layer, since when, and how it stands now.

:class:`FindingLog` keeps, for every (layer, kind), the step it first appeared (its onset) and its
latest state, so a layer that died at step 4 and went NaN at step 5 reports both, in that order.
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

    def __str__(self) -> str:
        state = "" if self.active else f" (cleared by step {self.last_step})"
        return f"[{self.severity}] {self.layer}: {self.message} (since step {self.step}){state}"


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
            self._entries[key] = dataclasses.replace(f, step=onset, last_step=step, active=True)
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
            self._entries[(f.layer, f.kind)] = f
