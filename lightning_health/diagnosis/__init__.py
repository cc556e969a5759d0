"""Readings in, plain-English findings out: thresholds, one function per rule, the findings log, hints.

May import only the standard library: the diagnosis is pure host-side judgement over floats, shared by
the live monitor and the offline report.
"""

from lightning_health.diagnosis.baseline import GradBaseline
from lightning_health.diagnosis.findings import KINDS, Finding, FindingLog, Severity
from lightning_health.diagnosis.hints import HINTS
from lightning_health.diagnosis.replay import diagnose_curves
from lightning_health.diagnosis.rules import evaluate
from lightning_health.diagnosis.thresholds import Thresholds

__all__ = [
    "HINTS",
    "KINDS",
    "Finding",
    "FindingLog",
    "GradBaseline",
    "Severity",
    "Thresholds",
    "diagnose_curves",
    "evaluate",
]
