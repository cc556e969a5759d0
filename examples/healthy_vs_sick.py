"""Two patients, one network: the demo as a plain script to read and copy.

The same 8-16-16-16-16-4 ReLU MLP on the same 80 synthetic samples, trained with plain SGD twice:
healthy (Kaiming initialisation, learning rate 0.05) and sick (N(0, 1) initialisation, learning
rate 0.8). A HealthMonitor reads every layer at every step and a TensorBoardLogger keeps one run per
patient; at the end each run's chart and findings are printed.

Run (about half a minute on a laptop CPU)::

    python examples/healthy_vs_sick.py --out runs
    tensorboard --logdir runs
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_health import HealthMonitor
from lightning_health.offline.patients import PatientMLP, patient_loaders
from lightning_health.sinks.console import print_report

PATIENTS = {
    "healthy": {"init": "kaiming", "lr": 0.05},
    "sick": {"init": "normal", "lr": 0.8},
}


def train(name: str, out: str, epochs: int, progress: bool) -> HealthMonitor:
    pl.seed_everything(11, verbose=False)
    # The sick patient's disease runs its course within a few steps, so read every step, and call a unit
    # dead once it has stayed silent over 2 sampled batches (16 examples each).
    monitor = HealthMonitor(every_n_steps=1, dead_window=2, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=TensorBoardLogger(out, name=name, version="", default_hp_metric=False),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        log_every_n_steps=1,
    )
    train_loader, val_loader = patient_loaders(batch_size=16)
    trainer.fit(PatientMLP(seed=11, **PATIENTS[name]), train_loader, val_loader)
    return monitor


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a healthy and a sick network and diagnose both.")
    parser.add_argument("--out", default="runs", help="TensorBoard log directory (default ./runs)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    for name in PATIENTS:
        monitor = train(name, args.out, args.epochs, progress=not args.no_progress)
        print_report(monitor.report(title=f"{name} patient"))
    print(f"\nOpen both runs: tensorboard --logdir {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
