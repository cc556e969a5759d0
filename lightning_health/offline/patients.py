"""The patients: one small ReLU MLP on one synthetic task, dosed to stay healthy or to fall ill.

Used by the demo, the examples and the tests. Same 8-16-16-16-16-4 network, same 80 samples, same
seed; only the dosing differs:

- healthy: He (Kaiming) initialisation, lr 0.05;
- dying: Kaiming initialisation, lr 0.2 and ``bias_pull=1.5``, a regulariser that adds
  ``1.5 * sum(hidden biases)`` to the loss (the sign error of a bias penalty): every step drags the
  biases down, units stop firing one after another and the dead fraction climbs to 1.0, with every
  value finite;
- exploding (the ``sick`` patient of the earlier demo): N(0, 1) weights and lr 0.8: the gradients
  explode at step 1 and the values are NaN from step 3.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover
    import pytorch_lightning as pl  # type: ignore[no-redef]

WIDTHS = (8, 16, 16, 16, 16, 4)


def patient_data(samples: int = 80, features: int = 8, classes: int = 4, seed: int = 7) -> TensorDataset:
    """Gaussian blobs: ``classes`` centres in ``features`` dimensions, ``samples`` points in all."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, features, generator=g) * 2.0
    labels = torch.arange(samples) % classes
    inputs = centres[labels] + torch.randn(samples, features, generator=g)
    return TensorDataset(inputs, labels)


def patient_loaders(batch_size: int = 16, seed: int = 7) -> tuple[DataLoader, DataLoader]:
    """Train loader (shuffled, seeded) and a validation loader over the same 80 samples."""
    data = patient_data(seed=seed)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=g), DataLoader(data, batch_size=40)


class PatientMLP(pl.LightningModule):
    """An 8-16-16-16-16-4 ReLU MLP trained with plain SGD.

    Args:
        init: ``"kaiming"`` (healthy) or ``"normal"`` (N(0, 1) weights and biases: sick).
        lr: the SGD learning rate.
        seed: the initialisation seed.
        bias_pull: adds ``bias_pull * sum(hidden-layer biases)`` to the training loss, a steady
            downward drift of the biases that kills ReLU units with no NaN (``0``: none).
    """

    def __init__(
        self,
        init: Literal["kaiming", "normal"] = "kaiming",
        lr: float = 0.05,
        seed: int = 11,
        bias_pull: float = 0.0,
    ) -> None:
        super().__init__()
        self.lr = lr
        self.bias_pull = bias_pull
        g = torch.Generator().manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
            linear = nn.Linear(fan_in, fan_out)
            with torch.no_grad():
                if init == "kaiming":
                    linear.weight.copy_(torch.randn(fan_out, fan_in, generator=g) * (2.0 / fan_in) ** 0.5)
                    linear.bias.zero_()
                elif init == "normal":
                    linear.weight.copy_(torch.randn(fan_out, fan_in, generator=g))
                    linear.bias.copy_(torch.randn(fan_out, generator=g))
                else:
                    raise ValueError(f"Expected `init` to be 'kaiming' or 'normal', got {init!r}")
            layers.append(linear)
            if i < len(WIDTHS) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        if self.bias_pull:
            hidden = [m for m in list(self.net)[:-1] if isinstance(m, nn.Linear)]
            loss = loss + self.bias_pull * sum(m.bias.sum() for m in hidden)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)
