"""Small but real set-ups for the diagnosis zoo: the architectures users train, healthy or dosed to fall ill.

Each builder returns ``(LightningModule, train DataLoader)``. Data is generated (a learnable rule) or
scikit-learn's digits; every model is built from code or a ``transformers`` config with random
weights; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

Optim = Callable[[Any], torch.optim.Optimizer]


def adam(lr: float = 1e-3) -> Optim:
    return lambda params: torch.optim.Adam(params, lr=lr)


def sgd(lr: float = 0.05, momentum: float = 0.9) -> Optim:
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)


class Task(pl.LightningModule):
    """A network, its loss and its optimizer; records the training loss per step."""

    def __init__(self, net: nn.Module, loss: Callable[[Any, Any], torch.Tensor], optim: Optim) -> None:
        super().__init__()
        self.net, self.loss_fn, self.optim = net, loss, optim
        self.losses: list[float] = []
        self.params_for_optimizer: list[nn.Parameter] | None = None  # None: every parameter

    def forward(self, x: Any) -> Any:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optim(self.params_for_optimizer or list(self.parameters()))


def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 32) -> DataLoader:
    return DataLoader(
        TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
    )


def digits(images: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    x = (x - x.mean()) / x.std()
    return (x.reshape(-1, 1, 8, 8) if images else x), torch.tensor(d.target)


def mlp(act: Callable[[], nn.Module], widths: tuple[int, ...], init: str = "he", bias: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        linear = nn.Linear(a, b)
        if init == "he":
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        elif init == "xavier":
            nn.init.xavier_normal_(linear.weight)
        elif init == "normal":
            nn.init.normal_(linear.weight, std=1.0)
        nn.init.constant_(linear.bias, bias if i < len(widths) - 2 else 0.0)
        layers.append(linear)
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def digits_mlp(act: Callable[[], nn.Module] = nn.ReLU, init: str = "he", optim: Optim | None = None,
               depth: int = 2, width: int = 64, bias: float = 0.0) -> tuple[Task, DataLoader]:  # fmt: skip
    torch.manual_seed(0)
    x, y = digits()
    net = mlp(act, (64, *([width] * depth), 10), init, bias)
    return Task(net, nn.functional.cross_entropy, optim or adam()), _loader(x, y)


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(x + self.bn2(self.conv2(h)))


def digits_cnn(optim: Optim | None = None, zero_init_residual: bool = False) -> tuple[Task, DataLoader]:
    """``zero_init_residual``: each block's last BatchNorm starts at gamma 0, as torchvision's option of that name."""
    torch.manual_seed(0)
    x, y = digits(images=True)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        ResBlock(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    if zero_init_residual:
        nn.init.zeros_(net[3].bn2.weight)
    return Task(net, nn.functional.cross_entropy, optim or sgd()), _loader(x, y)


class ReZeroBlock(nn.Module):
    """``x + alpha * f(x)`` with ``alpha`` initialised at 0 (Bachlechner et al., 2020, ReZero)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d))
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * self.f(x)


def rezero_mlp() -> tuple[Task, DataLoader]:
    torch.manual_seed(0)
    x, y = digits()
    net = nn.Sequential(nn.Linear(64, 64), *[ReZeroBlock(64) for _ in range(4)], nn.Linear(64, 10))
    return Task(net, nn.functional.cross_entropy, adam()), _loader(x, y)


def _sequences(n: int = 512, length: int = 12, vocab: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences; the label is the most frequent token of the first half (learnable, not trivial)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    return ids, torch.mode(ids[:, : length // 2], dim=1).values % 4


class RecurrentClassifier(nn.Module):
    def __init__(self, cell: type[nn.RNNBase], vocab: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.rnn = cell(16, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _state = self.rnn(self.embed(ids))
        return self.head(out[:, -1])


def recurrent(cell: type[nn.RNNBase]) -> tuple[Task, DataLoader]:
    torch.manual_seed(0)
    ids, y = _sequences()
    return Task(RecurrentClassifier(cell), nn.functional.cross_entropy, adam(3e-3)), _loader(ids, y)


class EncoderClassifier(nn.Module):
    """nn.TransformerEncoder over padded sequences (token 0 is padding), mean-pooled."""

    def __init__(self, vocab: int = 16, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == 0
        h = self.encoder(self.embed(ids), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        return self.head((h * keep).sum(1) / keep.sum(1))


def encoder(optim: Optim | None = None) -> tuple[Task, DataLoader]:
    torch.manual_seed(0)
    ids, y = _sequences()
    ids[:, -3:] = 0  # padding at the end of every sequence
    return Task(EncoderClassifier(), nn.functional.cross_entropy, optim or adam()), _loader(ids, y)


class HFLanguageModel(nn.Module):
    """A ``transformers`` causal or masked LM; ``forward(ids)`` returns logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if getattr(self.model.config, "is_encoder_decoder", False):  # T5: the decoder reads the same ids
            return self.model(input_ids=ids, decoder_input_ids=ids).logits
        return self.model(input_ids=ids).logits


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _copy_task(vocab: int, length: int = 16, n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token prediction on sequences that repeat their first half: the second half is learnable."""
    g = torch.Generator().manual_seed(0)
    half = torch.randint(1, vocab, (n, length // 2), generator=g)
    ids = torch.cat([half, half], dim=1)
    targets = torch.roll(ids, -1, dims=1)
    return ids, targets


def hf_lm(kind: str, optim: Optim | None = None) -> tuple[Task, DataLoader]:
    import transformers as tf

    torch.manual_seed(0)
    vocab, small = 64, {"vocab_size": 64}
    if kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=32, **small))
    elif kind == "llama":
        config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=32, **small)  # fmt: skip
        model = tf.LlamaForCausalLM(config)
    elif kind == "gemma":  # tanh-approximated GELU (gelu_pytorch_tanh) in a gated MLP
        config = tf.GemmaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=1, head_dim=16, max_position_embeddings=32, **small)  # fmt: skip
        model = tf.GemmaForCausalLM(config)
    elif kind == "t5":
        config = tf.T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, **small)
        model = tf.T5ForConditionalGeneration(config)
    elif kind == "bert":
        config = tf.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=32, **small)  # fmt: skip
        model = tf.BertForMaskedLM(config)
    else:
        raise ValueError(kind)
    model.config.attn_implementation = "eager"
    ids, targets = _copy_task(vocab)
    return Task(HFLanguageModel(model), _lm_loss, optim or adam(1e-3)), _loader(ids, targets)


def multilabel(optim: Optim | None = None) -> tuple[Task, DataLoader]:
    """Digits as 12 binary labels, four of them rare (1-3% positive): a BCE head with negative logits."""
    torch.manual_seed(0)
    x, y = digits()
    common = nn.functional.one_hot(y, 10).float()[:, :8]
    g = torch.Generator().manual_seed(1)
    rare = (torch.rand(len(y), 4, generator=g) < torch.tensor([0.01, 0.02, 0.02, 0.03])).float()
    net = mlp(nn.ReLU, (64, 64, 12), "he")
    return Task(net, nn.functional.binary_cross_entropy_with_logits, optim or adam()), _loader(
        x, torch.cat([common, rare], 1)
    )


def autoencoder(last: type[nn.Module]) -> tuple[Task, DataLoader]:
    """Digits reconstructed through a 32-unit GELU code; a Sigmoid (BCE) or Tanh (MSE, pixels in [-1, 1])
    output whose background pixels sit at the activation's limit by design."""
    torch.manual_seed(0)
    x, _y = digits()
    x = (x - x.min()) / (x.max() - x.min())
    net = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 64), last())
    if last is nn.Sigmoid:
        return Task(net, nn.functional.binary_cross_entropy, adam(3e-3)), _loader(x, x)
    return Task(net, nn.functional.mse_loss, adam(3e-3)), _loader(x, 2 * x - 1)


class GAN(pl.LightningModule):
    """A small GAN on digits in [-1, 1]: manual optimization, D then G each step with Lightning's
    ``toggle_optimizer``; the generator ends in a Tanh whose background pixels sit at -1 by design."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.G = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh())
        self.D = nn.Sequential(nn.Linear(64, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, _ = batch
        opt_g, opt_d = self.optimizers()  # type: ignore[misc]
        noise = torch.randn(real.shape[0], 16)
        bce = nn.functional.binary_cross_entropy_with_logits
        ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
        self.toggle_optimizer(opt_d)
        loss_d = bce(self.D(real), ones) + bce(self.D(self.G(noise).detach()), zeros)
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        self.untoggle_optimizer(opt_d)
        self.toggle_optimizer(opt_g)
        loss_g = bce(self.D(self.G(noise)), ones)
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        self.untoggle_optimizer(opt_g)

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        betas = (0.5, 0.999)
        adam_g = torch.optim.Adam(self.G.parameters(), 2e-4, betas=betas)
        return adam_g, torch.optim.Adam(self.D.parameters(), 2e-4, betas=betas)


def gan() -> tuple[GAN, DataLoader]:
    torch.manual_seed(0)
    x, y = digits()
    x = 2 * (x - x.min()) / (x.max() - x.min()) - 1
    return GAN(), _loader(x, y)
