"""Kill half the network, then save it: four rescues for dead ReLU units, against doing nothing.

A 64-128-128-128-128-128-10 ReLU MLP on scikit-learn's bundled 8x8 digits (nothing is downloaded)
is trained with plain SGD at learning rate 0.5 on batches of 8 until about half the units of its
last hidden layer are dead: they output 0 for every validation digit, so they get no gradient and
never come back. A ``HealthMonitor`` logs each layer's dead fraction after every validation pass.

From that damaged checkpoint, each strategy then trains for the same number of epochs:

* ``do nothing`` -- keep going at learning rate 0.5 (the control);
* ``lower LR`` -- learning rate 0.05;
* ``LeakyReLU`` -- swap every ReLU for LeakyReLU(0.1) with :func:`~lightning_health.rescue.replace_activation`;
* ``re-init dead`` -- recycle the dead units with :func:`~lightning_health.rescue.reinit_dead_units`
  (fresh incoming weights, zero outgoing weights), then learning rate 0.05;
* ``GELU`` -- swap every ReLU for GELU.

The swaps alone change one thing only and keep learning rate 0.5; ``LeakyReLU + lower LR`` and
``GELU + lower LR`` add the lower learning rate, to show what a swap adds to it. The script draws dead
fraction and validation accuracy per epoch, one line per strategy, and prints a table of who wins and
at what cost.

"Dead" is the monitor's definition: the unit's output is never > 0 on the validation set. LeakyReLU
and GELU are positive exactly where ReLU is, so the numbers compare across activations; but under
those two a "dead" unit still passes a gradient and can climb back, under ReLU it cannot.

Run (a few minutes on 2 CPU cores; ``--quick`` takes seconds)::

    python examples/digits_rescue.py --out runs/digits_rescue.png --table runs/digits_rescue.md
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_health import HealthMonitor
from lightning_health.rescue import find_units_weights, reinit_dead_units, replace_activation

WIDTHS = (64, 128, 128, 128, 128, 128, 10)
ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.GELU)
COLORS = ("tab:gray", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:olive", "tab:blue")


@dataclass(frozen=True)
class Settings:
    """How long each phase runs and how hard the damage is.

    Attributes:
        damage_epochs: epochs at ``damage_lr`` that kill the units.
        rescue_epochs: epochs each strategy trains for, from the damaged checkpoint.
        damage_lr: the learning rate that does the damage.
        batch_size: the training batch size (small batches make the big steps noisier and deadlier).
        clip_norm: gradient-norm clip; it keeps lr 0.5 from overflowing to NaN (we want dead units, not NaNs).
        seed: seeds the split, the initialisation, the batch order and the recycled weights.
    """

    damage_epochs: int = 4
    rescue_epochs: int = 20
    damage_lr: float = 0.5
    batch_size: int = 8
    clip_norm: float = 10.0
    seed: int = 0


FULL = Settings()
QUICK = Settings(damage_epochs=3, rescue_epochs=1)


# -- data and model -------------------------------------------------------------------------------------
def digits_data(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """The 1797 8x8 digits, split 80/20 (stratified), standardised with the training split's statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std == 0] = 1.0  # the always-blank corner pixels

    def tensors(inputs: Any, labels: Any) -> TensorDataset:
        return TensorDataset(torch.tensor((inputs - mean) / std, dtype=torch.float32), torch.tensor(labels))

    return tensors(x_train, y_train), tensors(x_val, y_val)


class DigitsMLP(pl.LightningModule):
    """A 5-hidden-layer, 128-wide ReLU MLP trained with plain SGD (no momentum, no weight decay).

    Args:
        lr: the SGD learning rate (change it between fits by setting ``model.lr``).
    """

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
            layers.append(nn.Linear(fan_in, fan_out))
            if i < len(WIDTHS) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        self.val_acc: list[float] = []
        self._correct = self._seen = 0

    def hidden_activations(self) -> list[str]:
        """Qualified names of the hidden activations, first to last (``net.1`` ... ``net.9``)."""
        return [f"net.{i}" for i, m in enumerate(self.net) if isinstance(m, ACTIVATIONS)]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def on_validation_epoch_start(self) -> None:
        self._correct = self._seen = 0

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self._correct += int((self(x).argmax(-1) == y).sum())
        self._seen += len(y)

    def on_validation_epoch_end(self) -> None:
        self.val_acc.append(self._correct / max(self._seen, 1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


# -- one phase of training, measured --------------------------------------------------------------------
@dataclass
class Run:
    """What one phase measured: per epoch, the dead fractions and the validation accuracy."""

    name: str
    lr: float
    change: str
    first_epoch: int
    dead_last: list[float] = field(default_factory=list)
    dead_mean: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    treat_s: float = 0.0
    train_s: float = 0.0
    nonfinite_step: int | None = None  # where the monitor first saw NaN/Inf, if it did

    @property
    def epochs(self) -> list[int]:
        return list(range(self.first_epoch, self.first_epoch + len(self.val_acc)))


def fit(model: DigitsMLP, run: Run, settings: Settings, train: TensorDataset, val: TensorDataset) -> Run:
    """Train ``model`` for the phase's epochs at ``run.lr``; fill ``run`` from a HealthMonitor and the model."""
    epochs = settings.damage_epochs if run.first_epoch == 1 else settings.rescue_epochs
    pl.seed_everything(settings.seed + run.first_epoch, verbose=False)  # every strategy sees the same batches
    order = torch.Generator().manual_seed(settings.seed + run.first_epoch)
    train_loader = DataLoader(train, batch_size=settings.batch_size, shuffle=True, generator=order)
    val_loader = DataLoader(val, batch_size=len(val))
    # val_dead_fraction is exact over each validation pass: one reading per epoch per layer.
    monitor = HealthMonitor(every_n_steps=20, verbose=False, log_histograms=False, dormant_threshold=None)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        gradient_clip_val=settings.clip_norm,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    model.lr = run.lr
    model.val_acc = []
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the monitor's "units died" warnings are the point of the exercise here
        trainer.fit(model, train_loader, val_loader)
    run.train_s = time.perf_counter() - start
    curves = monitor.curves("val_dead_fraction")
    layers = model.hidden_activations()
    per_layer = [[value for _, value in curves[name]] for name in layers]
    run.dead_last = per_layer[-1]
    run.dead_mean = [sum(values) / len(values) for values in zip(*per_layer)]
    run.val_acc = list(model.val_acc)
    # A network full of NaN also "never fires"; the monitor's nonfinite finding tells the two apart.
    run.nonfinite_step = next((f.step for f in monitor.diagnose() if f.kind == "nonfinite"), None)
    return run


# -- the treatments -------------------------------------------------------------------------------------
@contextmanager
def _fire_hooks(model: DigitsMLP, fired: dict[str, Tensor]) -> Iterator[None]:
    handles = []
    for name in model.hidden_activations():

        def hook(module: nn.Module, args: Any, output: Tensor, name: str = name) -> None:
            seen = (output > 0).any(dim=0)
            fired[name] = fired[name] | seen if name in fired else seen

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def dead_masks(model: DigitsMLP, data: TensorDataset) -> dict[str, Tensor]:
    """Per hidden activation, the units that output <= 0 for every example of ``data`` (the monitor's definition)."""
    fired: dict[str, Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        with _fire_hooks(model, fired):
            for x, _ in DataLoader(data, batch_size=512):
                model(x)
    finally:
        model.train(was_training)
    return {name: ~mask for name, mask in fired.items()}


def nothing(model: DigitsMLP, train: TensorDataset, seed: int) -> str:
    return "none"


def reinit(model: DigitsMLP, train: TensorDataset, seed: int) -> str:
    # Dead on the whole training set = frozen for good; those are the units worth recycling.
    generator = torch.Generator().manual_seed(seed)
    total = 0
    for name, mask in dead_masks(model, train).items():
        weights = find_units_weights(model, name)
        # Plain SGD keeps no per-parameter state; with momentum/Adam pass `optimizer=` to reset it too.
        total += reinit_dead_units(weights.layer_in, weights.layer_out, mask, norms=weights.norms, generator=generator)
    return f"recycled {total} units"


def swap_to(factory: Callable[[], nn.Module]) -> Callable[[DigitsMLP, TensorDataset, int], str]:
    def swap(model: DigitsMLP, train: TensorDataset, seed: int) -> str:
        replaced = replace_activation(model, nn.ReLU, factory)
        return f"{len(replaced)} activations swapped"

    return swap


# name -> (learning rate after the damage, treatment)
STRATEGIES: dict[str, tuple[float, Callable[[DigitsMLP, TensorDataset, int], str]]] = {
    "do nothing": (0.5, nothing),
    "lower LR": (0.05, nothing),
    "LeakyReLU": (0.5, swap_to(lambda: nn.LeakyReLU(0.1))),
    "re-init dead": (0.05, reinit),
    "GELU": (0.5, swap_to(nn.GELU)),
    # The swaps once more, with the lower learning rate too: what does the swap add to lowering the LR?
    "LeakyReLU + lower LR": (0.05, swap_to(lambda: nn.LeakyReLU(0.1))),
    "GELU + lower LR": (0.05, swap_to(nn.GELU)),
}


# -- the experiment ---------------------------------------------------------------------------------------
def experiment(settings: Settings) -> tuple[Run, list[Run]]:
    """The damage phase, then every strategy from the same damaged weights."""
    # A net this small runs fastest on one thread: more threads only wait on each other (20x slower on a busy CPU).
    torch.set_num_threads(1)
    train, val = digits_data(settings.seed)
    pl.seed_everything(settings.seed, verbose=False)
    model = DigitsMLP(lr=settings.damage_lr)
    damage = fit(model, Run("damage", settings.damage_lr, "-", first_epoch=1), settings, train, val)
    print(
        f"damage phase: after {settings.damage_epochs} epochs at lr {settings.damage_lr}, "
        f"{damage.dead_last[-1]:.0%} of the last hidden layer is dead "
        f"({damage.dead_mean[-1]:.0%} over all hidden layers), val acc {damage.val_acc[-1]:.3f}",
        flush=True,
    )
    # The damaged checkpoint. Plain SGD without momentum keeps no per-parameter state, so the weights are
    # the whole of it; each strategy builds a fresh optimizer with its own learning rate.
    checkpoint = copy.deepcopy(model.state_dict())

    runs = []
    for name, (lr, treatment) in STRATEGIES.items():
        patient = DigitsMLP(lr=lr)
        patient.load_state_dict(checkpoint)
        start = time.perf_counter()
        change = treatment(patient, train, settings.seed)
        treat_s = time.perf_counter() - start
        run = fit(patient, Run(name, lr, change, first_epoch=settings.damage_epochs + 1), settings, train, val)
        run.treat_s = treat_s
        print(
            f"{name:>20}: {change}; final val acc {run.val_acc[-1]:.3f}, last layer {run.dead_last[-1]:.0%} dead, "
            f"{run.train_s:.1f} s",
            flush=True,
        )
        runs.append(run)
    return damage, runs


def _nan(run: Run) -> str:
    return "no" if run.nonfinite_step is None else f"from step {run.nonfinite_step}"


def table(damage: Run, runs: Sequence[Run]) -> str:
    """The results as a markdown table, with the winners underneath."""
    lines = [
        "| strategy | what changed | lr | final val acc | best val acc | dead % last layer | dead % all layers "
        "| NaN/Inf | treatment (ms) | training (s) |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
        f"| damaged checkpoint (epoch {damage.epochs[-1]}) | - | {damage.lr:g} | {damage.val_acc[-1]:.3f} | "
        f"{max(damage.val_acc):.3f} | {damage.dead_last[-1]:.0%} | {damage.dead_mean[-1]:.0%} | {_nan(damage)} | - | "
        f"{damage.train_s:.1f} |",
    ]
    for run in runs:
        lines.append(
            f"| {run.name} | {run.change} | {run.lr:g} | {run.val_acc[-1]:.3f} | {max(run.val_acc):.3f} | "
            f"{run.dead_last[-1]:.0%} | {run.dead_mean[-1]:.0%} | {_nan(run)} | {run.treat_s * 1000:.1f} | "
            f"{run.train_s:.1f} |"
        )
    best = max(runs, key=lambda r: r.val_acc[-1])
    least_dead = min(runs, key=lambda r: (r.dead_last[-1], r.dead_mean[-1]))
    fastest = min(runs, key=lambda r: r.treat_s + r.train_s)
    lines += [
        "",
        f"Best final val accuracy: **{best.name}** ({best.val_acc[-1]:.3f}). "
        f"Fewest dead units: **{least_dead.name}** ({least_dead.dead_last[-1]:.0%} of the last layer). "
        f"Least wall time: **{fastest.name}** ({fastest.treat_s + fastest.train_s:.1f} s; times on a shared "
        "CPU are noisy, compare them loosely).",
    ]
    return "\n".join(lines)


def plot(damage: Run, runs: Sequence[Run], out: Path) -> None:
    """Two panels: dead fraction (last hidden layer solid, mean over layers dashed) and val accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (dead_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, ylabel in ((dead_ax, "dead fraction (val pass)"), (acc_ax, "validation accuracy")):
        ax.axvspan(0.5, damage.epochs[-1] + 0.5, color="0.92", zorder=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    dead_ax.plot(damage.epochs, damage.dead_last, color="k", marker=".", label="damage (lr 0.5)")
    dead_ax.plot(damage.epochs, damage.dead_mean, color="k", linestyle="--")
    acc_ax.plot(damage.epochs, damage.val_acc, color="k", marker=".", label="damage (lr 0.5)")
    for index, run in enumerate(runs):
        color = COLORS[index % len(COLORS)]
        # join each strategy's line to the damaged checkpoint it starts from
        epochs = [damage.epochs[-1], *run.epochs]
        dead_ax.plot(epochs, [damage.dead_last[-1], *run.dead_last], color=color, marker=".", label=run.name)
        dead_ax.plot(epochs, [damage.dead_mean[-1], *run.dead_mean], color=color, linestyle="--", lw=0.8, alpha=0.7)
        acc_ax.plot(epochs, [damage.val_acc[-1], *run.val_acc], color=color, marker=".", label=run.name)
    dead_ax.set_title("dead units: last hidden layer (solid), mean of 5 layers (dashed)", fontsize=10)
    acc_ax.set_title("validation accuracy", fontsize=10)
    dead_ax.set_ylim(-0.02, 1.0)
    handles, labels = acc_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("Kill half the network (shaded: lr 0.5), then save it", fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Kill half of a ReLU MLP's units on digits, then try four rescues.")
    parser.add_argument("--out", type=Path, default=Path("runs/digits_rescue.png"), help="the PNG to write")
    parser.add_argument("--table", type=Path, default=Path("runs/digits_rescue.md"), help="the markdown table to write")
    parser.add_argument("--quick", action="store_true", help="a few epochs only (seconds; used by the tests)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split, init, batch order, recycled weights")
    args = parser.parse_args(argv)
    # No "GPU available" banner for each fit (Lightning logs it through whichever of its packages was imported last).
    for name in (
        "lightning.pytorch",
        "lightning.fabric",
        "pytorch_lightning",
        "lightning_fabric",
        "lightning_utilities",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)

    damage, runs = experiment(dataclasses.replace(QUICK if args.quick else FULL, seed=args.seed))
    text = table(damage, runs)
    print()
    print(text)
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(text + "\n", encoding="utf-8")
    plot(damage, runs, args.out)
    print(f"\nwrote {args.out} and {args.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
