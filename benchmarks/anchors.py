"""The monitors ``HealthMonitor`` is compared with, as Lightning callbacks written for this benchmark.

* :class:`WandbWatch`: ``wandb.watch(model, log="all", log_freq=K)`` on the Trainer's real
  (offline) W&B run: parameter and parameter-gradient histograms every ``K`` batches. It reads no
  activations at all.
* :class:`ModuleDataMonitor`: our re-implementation of lightning-bolts'
  ``pl_bolts.callbacks.ModuleDataMonitor(submodules=True)`` (bolts no longer installs next to current
  Lightning). Like the original, a forward hook on *every* submodule (the root included) detaches the
  module's inputs and outputs, copies them to the host and hands each to the logger as a histogram
  (``SummaryWriter.add_histogram`` builds it with NumPy in float64), on every sampled batch.
* :class:`HostCopyMonitor`: the textbook approach. Forward hooks on the activation modules copy each
  activation, and a tensor hook each activation gradient, to the host (``.cpu().numpy()``); NumPy
  computes mean, std, min, max, zero fraction and a 64-bin histogram per tensor; the scalars go to
  ``logger.log_metrics`` once per sampled step and the histograms to TensorBoard as raw counts.

These are reference points, not products: each mimics the cost profile of what users run today.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

#: Module classes treated as activations by the textbook monitor (the same family HealthMonitor watches).
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
)


def _check_every(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive int, got {value!r}")


class WandbWatch(Callback):
    """``wandb.watch(log="all")`` for the length of a fit, as a W&B user switches it on.

    The Trainer's logger must be a :class:`~lightning.pytorch.loggers.WandbLogger` (offline is fine).
    W&B's hooks log histograms with ``commit=False``; we commit the row on every watched batch, as
    ``WandbLogger.log_metrics`` does in a run that logs a metric at that cadence.

    Args:
        log_freq: Log parameter and gradient histograms every ``log_freq`` batches.
    """

    def __init__(self, log_freq: int = 50) -> None:
        _check_every("log_freq", log_freq)
        self.log_freq = log_freq
        self._batches = 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(trainer.logger, WandbLogger):
            raise ValueError(
                f"`WandbWatch` needs a `WandbLogger` as the Trainer's logger, got {type(trainer.logger).__name__}"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches = 0
        trainer.logger.experiment.watch(pl_module, log="all", log_freq=self.log_freq, log_graph=False)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches += 1
        if self._batches % self.log_freq == 0:
            trainer.logger.experiment.log({"trainer/global_step": trainer.global_step}, commit=True)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(trainer.logger, WandbLogger) and trainer.logger._experiment is not None:
            trainer.logger.experiment.unwatch(pl_module)


def _named_tensors(data: Any, prefix: str, out: dict[str, Tensor]) -> None:
    """Collect the tensors of a (nested) collection under ``prefix/<key or index>/[shape]`` names."""
    if isinstance(data, Tensor):
        out[f"{prefix}/[{', '.join(map(str, data.shape))}]"] = data
    elif isinstance(data, dict):
        for key, value in data.items():
            _named_tensors(value, f"{prefix}/{key}", out)
    elif isinstance(data, Sequence) and not isinstance(data, str):
        for index, item in enumerate(data):
            _named_tensors(item, f"{prefix}/{index}", out)


class ModuleDataMonitor(Callback):
    """Bolts-style input/output histograms of every submodule, logged from inside the forward pass.

    Args:
        log_every_n_steps: Log on batches where ``(batch_idx + 1) % log_every_n_steps == 0`` (bolts' rule).
    """

    def __init__(self, log_every_n_steps: int = 1) -> None:
        _check_every("log_every_n_steps", log_every_n_steps)
        self.log_every_n_steps = log_every_n_steps
        self._handles: list[RemovableHandle] = []
        self._trainer: pl.Trainer | None = None
        self._batch_idx = 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(trainer.logger, (TensorBoardLogger, WandbLogger)):
            raise ValueError(
                "`ModuleDataMonitor` needs a `TensorBoardLogger` or `WandbLogger` as the Trainer's logger,"
                f" got {type(trainer.logger).__name__}"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        for name, module in pl_module.named_modules():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def _make_hook(self, name: str) -> Any:
        input_group = f"input/{name}" if name else "input"
        output_group = f"output/{name}" if name else "output"

        def hook(_: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not self._active():
                return
            self._log_histograms(inputs[0] if len(inputs) == 1 else inputs, input_group)
            self._log_histograms(output, output_group)

        return hook

    def _active(self) -> bool:
        trainer = self._trainer
        return trainer is not None and trainer.training and (self._batch_idx + 1) % self.log_every_n_steps == 0

    def _log_histograms(self, data: Any, group: str) -> None:
        tensors: dict[str, Tensor] = {}
        _named_tensors(data, group, tensors)
        assert self._trainer is not None
        logger = self._trainer.logger
        step = self._trainer.global_step
        for name, tensor in tensors.items():
            values = tensor.detach().cpu()
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram(tag=name, values=values, global_step=step)
            elif isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({name: wandb.Histogram(values)}, commit=False)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._trainer = None


def host_statistics(values: np.ndarray, bins: int) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Textbook per-tensor statistics on the host: moments, extremes, zero fraction, histogram.

    Args:
        values: Any-shaped array; flattened.
        bins: Number of equal-width histogram bins between the minimum and the maximum.

    Returns:
        The scalar statistics, the bin counts and the ``bins + 1`` bin edges.

    Example:
        >>> stats, counts, edges = host_statistics(np.array([0.0, 1.0, 2.0, 3.0]), bins=2)
        >>> stats["zero_fraction"], counts.tolist()
        (0.25, [2, 2])
    """
    flat = values.reshape(-1)
    stats = {
        "mean": float(flat.mean()),
        "std": float(flat.std()),
        "min": float(flat.min()),
        "max": float(flat.max()),
        "zero_fraction": float(np.count_nonzero(flat == 0) / flat.size),
    }
    counts, edges = np.histogram(flat, bins=bins)
    return stats, counts, edges


class HostCopyMonitor(Callback):
    """The textbook monitor: activations and activation gradients copied to the host, statistics in NumPy.

    Args:
        every_n_steps: Sample steps where ``global_step % every_n_steps == 0``.
        bins: Histogram bins per tensor.
    """

    def __init__(self, every_n_steps: int = 1, bins: int = 64) -> None:
        _check_every("every_n_steps", every_n_steps)
        _check_every("bins", bins)
        self.every_n_steps = every_n_steps
        self.bins = bins
        self._handles: list[RemovableHandle] = []
        self._sampling = False
        self._scalars: dict[str, float] = {}
        self._histograms: dict[str, tuple[dict[str, float], np.ndarray, np.ndarray, int, float]] = {}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, module in pl_module.named_modules():
            if isinstance(module, ACTIVATION_TYPES):
                self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def _record(self, kind: str, layer: str, tensor: Tensor) -> None:
        values = tensor.detach().cpu().numpy()
        stats, counts, edges = host_statistics(values, self.bins)
        for key, value in stats.items():
            self._scalars[f"{kind}_{key}/{layer}"] = value
        num = values.size
        sum_squares = num * (stats["std"] ** 2 + stats["mean"] ** 2)
        self._histograms[f"{kind}/{layer}"] = (stats, counts, edges, num, sum_squares)

    def _make_hook(self, layer: str) -> Any:
        def hook(_: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not self._sampling or not isinstance(output, Tensor):
                return
            self._record("act", layer, output)
            if output.requires_grad:
                output.register_hook(lambda grad: self._record("grad", layer, grad))

        return hook

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._sampling = trainer.global_step % self.every_n_steps == 0

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._sampling:
            return
        self._sampling = False
        step = trainer.global_step - 1  # the optimizer step of this batch has already advanced the counter
        for logger in trainer.loggers:
            logger.log_metrics(self._scalars, step=step)
            if isinstance(logger, TensorBoardLogger):
                for tag, (stats, counts, edges, num, sum_squares) in self._histograms.items():
                    logger.experiment.add_histogram_raw(
                        tag,
                        min=stats["min"],
                        max=stats["max"],
                        num=num,
                        sum=stats["mean"] * num,
                        sum_squares=sum_squares,
                        bucket_limits=edges[1:].tolist(),
                        bucket_counts=counts.tolist(),
                        global_step=step,
                    )
        self._scalars = {}
        self._histograms = {}

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._sampling = False
