"""The monitor's own faults and a model's late branches never cost the user a reading or a run.

- A diagnosis rule that raises is one warning; the other rules still judge, and training goes on.
- A layer set aside for never running in the first sampled steps comes back when it runs later
  (a rarely routed expert, a head switched on mid-run), instead of being lost for the whole run.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_health import HealthMonitor
from lightning_health.diagnosis import rules
from lightning_health.offline.patients import PatientMLP, patient_loaders
from tests.conftest import trainer_kwargs


def _broken_rule(layer, readings, ctx):
    raise ZeroDivisionError("a bug in a rule")


def test_a_rule_that_raises_is_one_warning_and_the_other_rules_still_judge(monkeypatch) -> None:
    monkeypatch.setattr(rules, "RULES", (_broken_rule, *rules.RULES))
    monkeypatch.setattr(rules, "_FAILED", set())
    monitor = HealthMonitor(every_n_steps=1, verbose=False)
    model = PatientMLP(init="normal", lr=0.8)  # explodes into NaN within a few steps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=2))
        trainer.fit(model, *patient_loaders())
    assert trainer.global_step == 10  # the run was not stopped
    about_rule = [w for w in caught if "_broken_rule" in str(w.message)]
    assert len(about_rule) == 1 and "ZeroDivisionError" in str(about_rule[0].message)
    kinds = {f.kind for f in monitor.diagnose()}
    assert "nonfinite" in kinds  # the real rules still ran


class LateBranch(pl.LightningModule):
    """A trunk read from step 0 and a branch (its own GELU) that the model takes only from step 5 on."""

    def __init__(self, start: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.branch = nn.Sequential(nn.Linear(16, 16), nn.GELU())
        self.head = nn.Linear(16, 4)
        self.start = start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        if self.training and self.global_step >= self.start:
            h = h + self.branch(h)
        return self.head(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_layer_set_aside_early_comes_back_when_it_runs() -> None:
    monitor = HealthMonitor(every_n_steps=1, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=2)).fit(LateBranch(), *patient_loaders())
    notes = [str(w.message) for w in caught if "branch.1" in str(w.message)]
    assert any("left out of the reports" in n for n in notes), notes
    assert any("ran after all" in n for n in notes), notes
    assert "branch.1" in monitor.monitored_layers
    steps = [s for s, _v in monitor.curves("act_std")["branch.1"]]
    assert steps == list(range(5, 10))  # every sampled step it ran in, none before
    assert [s for s, _v in monitor.curves("act_std")["trunk.1"]] == list(range(10))


@pytest.mark.parametrize("start", [100])
def test_a_branch_that_never_runs_stays_out_of_the_reports(start: int) -> None:
    monitor = HealthMonitor(every_n_steps=1, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=2)).fit(LateBranch(start), *patient_loaders())
    assert "branch.1" not in monitor.monitored_layers
    assert "branch.1" not in monitor.curves("act_std")
    assert not [f for f in monitor.diagnose() if f.layer == "branch.1"]
