"""Never lose, misdirect or silently stop monitoring (issue 17): crashes then re-fits, resume keys in a
new process, validation inside an optimizer step, even history thinning, W&B bin limits, two
optimizers in one manual step, one-line user errors, and a CLI that starts without Lightning.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_health import HealthCriticalError, HealthMonitor
from lightning_health.offline.patients import PatientMLP, patient_loaders
from lightning_health.pipeline.history import History
from tests.conftest import read_tb_scalars, trainer_kwargs
from tests.fault_helpers import RESUME_SCRIPT, SET_LAYERS, relu_predicate

ROOT = Path(__file__).resolve().parents[1]


def _health(logdir: Path) -> dict[str, list[int]]:
    """The steps of every health scalar written under ``logdir``."""
    scalars = read_tb_scalars(logdir) if logdir.exists() else {}
    return {k: [s for s, _ in v] for k, v in scalars.items() if k.startswith("health/")}


# -- 1. a re-fit after a crash is monitored and writes to its own logger ---------------------------------------
class Crashes(PatientMLP):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step == 2 and self.kind == "nan":
            x = x.clone()
            x[0, 0] = float("inf")
        if self.global_step == 2 and self.kind == "training_step":
            raise RuntimeError("boom in training_step")
        if self.global_step == 2 and self.kind == "keyboard":
            raise KeyboardInterrupt
        out = self(x)
        if self.global_step == 2 and self.kind == "backward":
            out.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("boom in backward")))
        return nn.functional.cross_entropy(out, y)


@pytest.mark.parametrize("kind", ["training_step", "backward", "nan", "keyboard"])
def test_a_refit_after_a_crash_is_monitored_and_writes_only_to_the_new_logger(tmp_path, kind):
    monitor = HealthMonitor(every_n_steps=1, verbose=False, on_critical="raise")
    crashed = TensorBoardLogger(tmp_path, name="crashed", version=0)
    trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_steps=5, logger=crashed))
    expected = {"keyboard": SystemExit, "nan": HealthCriticalError}.get(kind, RuntimeError)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(expected):  # Lightning turns Ctrl+C into a graceful shutdown and sys.exit(1)
            trainer.fit(Crashes(kind), patient_loaders()[0])
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores SIGINT after a KeyboardInterrupt
    before = _health(Path(crashed.log_dir))
    assert before and max(s for steps in before.values() for s in steps) <= 2

    fresh = TensorBoardLogger(tmp_path, name="fresh", version=0)
    model = PatientMLP()
    pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_steps=3, logger=fresh)).fit(model, patient_loaders()[0])
    after = _health(Path(fresh.log_dir))
    assert after["health/act_std/net.1"] == [0, 1, 2]  # monitored from its first step
    assert _health(Path(crashed.log_dir)) == before  # nothing more went into the crashed run
    assert not model.net[1]._forward_hooks  # released after the re-fit too


# -- 2. resume keys ----------------------------------------------------------------------------------------
def _differing_hash_seed() -> str:
    """A PYTHONHASHSEED under which SET_LAYERS iterates in another order than in this process."""
    here = repr(list(SET_LAYERS))
    for seed in range(1, 64):
        code = f"print(repr(list({sorted(SET_LAYERS)!r} and set({sorted(SET_LAYERS)!r}))))"
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip()
        if out != here:
            return str(seed)
    pytest.skip("no hash seed gives another set order")


def test_a_predicate_and_a_set_resume_their_state_in_a_new_process(tmp_path):
    loader = DataLoader(patient_loaders()[0].dataset, batch_size=16)
    monitors = [
        HealthMonitor(every_n_steps=1, layers=relu_predicate, verbose=False),
        HealthMonitor(every_n_steps=1, layers=SET_LAYERS, verbose=False),
    ]
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{step}")
    pl.Trainer(callbacks=[*monitors, saver], **trainer_kwargs(max_epochs=1, enable_checkpointing=True)).fit(
        PatientMLP(), loader
    )
    ckpt = tmp_path / "step=5.ckpt"
    env = {**os.environ, "PYTHONHASHSEED": _differing_hash_seed(), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", RESUME_SCRIPT, str(ckpt)], env=env, capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    curves = json.loads(out.stdout.strip().splitlines()[-1])
    for got, monitor in zip(curves, monitors):
        assert got["steps"] == list(range(10))  # steps 0-4 from the checkpoint, 5-9 after the resume
        assert got["values"][:5] == pytest.approx([v for _, v in monitor.curves("act_std")["net.3"]])
    missing = [line for line in out.stderr.splitlines() if "Please add the following callbacks" in line]
    assert not [line for line in missing if "HealthMonitor" in line]  # Lightning found both monitors' states


def test_a_name_lets_two_monitors_coexist_and_a_changed_cadence_carries_state_over(tmp_path):
    a, b = HealthMonitor(name="a", verbose=False), HealthMonitor(name="b", verbose=False)
    assert a.state_key != b.state_key
    assert HealthMonitor(every_n_steps=5).state_key == HealthMonitor(every_n_steps=7).state_key
    saved = HealthMonitor(every_n_steps=1, verbose=False)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{step}")
    pl.Trainer(callbacks=[saved, saver], **trainer_kwargs(max_epochs=1, enable_checkpointing=True)).fit(
        PatientMLP(), patient_loaders()[0]
    )
    resumed = HealthMonitor(every_n_steps=2, verbose=False)
    with pytest.warns(UserWarning, match="sampled every 1 steps with every_n_steps=2; its history carries over"):
        pl.Trainer(callbacks=[resumed], **trainer_kwargs(max_epochs=2)).fit(
            PatientMLP(), patient_loaders()[0], ckpt_path=tmp_path / "step=5.ckpt"
        )
    assert [s for s, _ in resumed.curves("act_std")["net.1"]] == [0, 1, 2, 3, 4, 6, 8]


def test_state_saved_under_an_old_key_is_adopted_with_a_note(tmp_path):
    saved = HealthMonitor(every_n_steps=1, verbose=False)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{step}")
    pl.Trainer(callbacks=[saved, saver], **trainer_kwargs(max_epochs=1, enable_checkpointing=True)).fit(
        PatientMLP(), patient_loaders()[0]
    )
    path = tmp_path / "step=5.ckpt"
    ckpt = torch.load(path, weights_only=False)
    old_key = "HealthMonitor{'every_n_steps': 1, 'layers': 'None'}"  # what version 0.1.0 wrote
    ckpt["callbacks"] = {old_key: ckpt["callbacks"].pop(saved.state_key), **ckpt["callbacks"]}
    torch.save(ckpt, path)
    resumed = HealthMonitor(every_n_steps=1, verbose=False)
    with pytest.warns(UserWarning, match="resuming the monitor state saved under"):
        pl.Trainer(callbacks=[resumed], **trainer_kwargs(max_epochs=2)).fit(
            PatientMLP(), patient_loaders()[0], ckpt_path=path
        )
    assert [s for s, _ in resumed.curves("act_std")["net.1"]] == list(range(10))


# -- 3. a validation pass inside an optimizer step ---------------------------------------------------------
class KeepsActs(PatientMLP):
    def __init__(self) -> None:
        super().__init__()
        self.acts: dict[int, list[torch.Tensor]] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        a = self.net[1](self.net[0](x))
        self.acts.setdefault(self.global_step, []).append(a.detach().clone())
        return nn.functional.cross_entropy(self.net[2:](a), y)


def test_training_readings_survive_a_validation_pass_inside_the_step():
    model, monitor = KeepsActs(), HealthMonitor(every_n_steps=1, layers=["net.1"], verbose=False)
    train, val = patient_loaders()
    trainer = pl.Trainer(
        callbacks=[monitor],
        **trainer_kwargs(max_epochs=1, accumulate_grad_batches=4, val_check_interval=2, num_sanity_val_steps=0),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train, val)
    stds = dict(monitor.curves("act_std")["net.1"])
    assert stds, "every training reading was lost"
    for step, acts in model.acts.items():
        if len(acts) == 4:  # a full optimizer step: readings over all four micro-batches
            assert stds[step] == pytest.approx(torch.cat(acts).double().std().item(), rel=1e-5)
    assert monitor.curves("val_dead_fraction")["net.1"]  # validation was read too


# -- 4 / 7. history thinning --------------------------------------------------------------------------------
def test_thinning_keeps_the_whole_run_evenly_and_the_run_within_its_budget():
    history = History(max_points=256)
    for i in range(3000):
        history.add(i, "act_std", "layer", float(i))
    steps = [s for s, _ in history.curves("act_std")["layer"]]
    gaps = np.diff(steps)
    assert steps[0] == 0 and steps[-1] == 2999 and len(steps) <= 257
    assert gaps.max() <= 2 * gaps.mean()
    restored = History(max_points=256)
    restored.load_state_dict(history.state_dict())
    for i in range(3000, 6000):
        restored.add(i, "act_std", "layer", float(i))
        history.add(i, "act_std", "layer", float(i))
    assert restored.curves("act_std") == history.curves("act_std")  # resumed thinning is the same

    deep = History(max_points=4096, max_total_points=20_000)  # 300 layers x 15 metrics at a 4096 cap
    for step in range(60):
        for series in range(4500):
            deep.add(step, f"m{series % 15}", str(series), 0.0)
    assert deep.cap() == 16 and deep.total_points() <= 4500 * 17


# -- 5. W&B's 512-bin limit ---------------------------------------------------------------------------------
def test_wandb_gets_scalars_and_rebinned_histograms_with_1024_bins(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    from tests.wandb_files import read_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(project="health", save_dir=str(tmp_path), offline=True)
    monitor = HealthMonitor(every_n_steps=1, histogram_bins=1024, verbose=False, heatmap_every_n_samples=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_steps=3, logger=logger)).fit(
                PatientMLP(), patient_loaders()[0]
            )
            run_dir = Path(logger.experiment.dir).parent
        finally:
            wandb.finish()
    assert not [w for w in caught if "stopped writing" in str(w.message)]
    rows = read_run(run_dir)["history"]
    assert [r["trainer/global_step"] for r in rows if "health/act_std/net.1" in r] == [0, 1, 2]
    hists = [r for r in rows if r.get("health/activations/net.1/_type") == "histogram"]
    assert len(hists) == 3
    for row in hists:
        values, bins = row["health/activations/net.1/values"], row["health/activations/net.1/bins"]
        assert len(values) <= 512 and len(bins) == len(values) + 1
        assert sum(values) == min(8192, 16 * 16)  # every sampled value still counted


# -- 8. two optimizers in one manual step --------------------------------------------------------------------
class Gan(pl.LightningModule):
    """D steps on its own loss, then G's loss backpropagates through D again (Lightning's GAN recipe)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.g = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        self.d = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.reference: dict[int, dict[str, float]] = {}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (x,) = batch
        step, (opt_d, opt_g) = self.global_step, self.optimizers()
        fake = self.g(torch.randn(x.shape[0], 4))
        h_real, h_fake = self.d[1](self.d[0](x)), self.d[1](self.d[0](fake.detach()))
        h_real.retain_grad()
        h_fake.retain_grad()
        d_loss = self.d[2](h_real).mean() - self.d[2](h_fake).mean()
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        ref = {"d.0": torch.cat([p.grad.flatten() for p in self.d[0].parameters()]).norm().item()}
        ref["d.1"] = torch.cat([h_real.grad, h_fake.grad]).double().norm().item()
        opt_d.step()
        opt_g.zero_grad()
        self.manual_backward(-self.d(fake).mean())  # adds to D's gradients (D already stepped): not D's reading
        ref["g.0"] = torch.cat([p.grad.flatten() for p in self.g[0].parameters()]).norm().item()
        opt_g.step()
        self.reference[step] = ref

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.d.parameters(), lr=0.1), torch.optim.SGD(self.g.parameters(), lr=0.1)


def test_two_optimizers_each_read_the_gradient_they_step_on():
    model = Gan()
    monitor = HealthMonitor(every_n_steps=1, layers=["d.1", "g.1"], verbose=False)
    data = DataLoader(torch.utils.data.TensorDataset(torch.randn(48, 4)), batch_size=16)
    pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=1)).fit(model, data)
    norms, grads = monitor.curves("param_grad_norm"), monitor.curves("grad_norm")
    assert len(model.reference) == 3 and [s for s, _ in norms["d.0"]] == sorted(model.reference)
    for (step, d_norm), (_, g_norm), (_, d_grad) in zip(norms["d.0"], norms["g.0"], grads["d.1"]):
        ref = model.reference[step]
        assert d_norm == pytest.approx(ref["d.0"], rel=1e-5)  # read before G's backward added to D's gradients
        assert g_norm == pytest.approx(ref["g.0"], rel=1e-5)
        assert d_grad == pytest.approx(ref["d.1"], rel=1e-5)  # the first backward reaching d.1: D's loss only


# -- 9. user errors: one line, naming the argument; a monitor setting never stops training ------------------
def _setup_error(**kwargs: Any) -> str:
    trainer = pl.Trainer(callbacks=[HealthMonitor(verbose=False, **kwargs)], **trainer_kwargs(max_steps=1))
    with pytest.raises(ValueError) as info:
        trainer.fit(PatientMLP(), patient_loaders()[0])
    message = str(info.value)
    assert "\n" not in message
    return message


def test_layer_typos_bad_neuron_dim_keys_and_a_raising_predicate_are_one_line_errors():
    assert "`layers` names modules the model does not have: 'net.11' (did you mean 'net.1'?)" in _setup_error(
        layers=["net.1", "net.11"]
    )
    assert "`neuron_dim` names modules the model does not have: 'nett.1'" in _setup_error(neuron_dim={"nett.1": 1})

    def raises(name: str, module: nn.Module) -> bool:
        return module.weight is not None  # AttributeError on a ReLU

    assert "`layers` predicate raised on module 'net'" in _setup_error(layers=raises)


@pytest.mark.parametrize("argument", ["log_histograms", "verbose", "dashboard", "compile_reductions"])
@pytest.mark.parametrize("value", ["no", 0, 1, None])
def test_booleans_accept_only_bools(argument, value):
    with pytest.raises(TypeError, match=f"Expected `{argument}` to be True or False"):
        HealthMonitor(**{argument: value})


def test_a_writer_path_that_cannot_be_created_warns_and_training_goes_on(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monitor = HealthMonitor(every_n_steps=1, writer=blocker / "runs", verbose=False)
    with pytest.warns(RuntimeWarning, match=r"HealthMonitor\(writer=.*cannot open a SummaryWriter there"):
        trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_steps=2))
        trainer.fit(PatientMLP(), patient_loaders()[0])
    assert trainer.global_step == 2 and [s for s, _ in monitor.curves("act_std")["net.1"]] == [0, 1]


# -- 10. the CLI starts without importing Lightning -----------------------------------------------------------
def test_the_cli_imports_neither_lightning_nor_the_callback():
    code = (
        "import sys, lightning_health.cli; print(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('lightning', 'pytorch_lightning') or m == 'lightning_health.callback'))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    from lightning_health import HealthMonitor as Lazy  # the public names still resolve (lazily)

    assert Lazy is HealthMonitor
