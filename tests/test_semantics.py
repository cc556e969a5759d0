"""What a reading means for each activation: measured by probing it, judged accordingly (issue 11, cases 2-5).

Each case is a real Trainer fit; references are computed in the test, by eager torch or by hand
from the activation's formula (the slope thresholds below are solved analytically, not probed).
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_health import HealthMonitor
from lightning_health.capture.profile import SATURATION_SLOPE
from lightning_health.capture.selection import activation_profile, select_layers
from tests.conftest import trainer_kwargs

transformers = pytest.importorskip("transformers")

# Slope below 20% of the peak, solved by hand: sigmoid y(1-y) < 0.2 * 0.25; tanh 1 - y^2 < 0.2;
# LogSigmoid 1 - e^y < 0.2.
SIGMOID_LOW = (1 - math.sqrt(1 - 4 * SATURATION_SLOPE * 0.25)) / 2
TANH_EDGE = math.sqrt(1 - SATURATION_SLOPE)
LOGSIGMOID_TOP = math.log(1 - SATURATION_SLOPE)


class Net(pl.LightningModule):
    """``net`` on 8 features, trained with SGD on a cross-entropy (or multi-label) loss."""

    def __init__(self, net: nn.Module, lr: float = 0.01, multilabel: bool = False) -> None:
        super().__init__()
        self.net, self.lr, self.multilabel = net, lr, multilabel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        if self.multilabel:
            return nn.functional.binary_cross_entropy_with_logits(out, y)
        return nn.functional.cross_entropy(out, y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _data(n: int = 64, labels: torch.Tensor | None = None) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g) if labels is None else labels
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _mlp(act: nn.Module, bias: float | None = None, weight_scale: float | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), act, nn.Linear(32, 4))
    with torch.no_grad():
        if weight_scale is not None:
            net[0].weight.mul_(weight_scale)
        if bias is not None:
            net[0].bias.fill_(bias)
    return net


def _fit(model: pl.LightningModule, loader: DataLoader, steps: int = 4, **monitor: Any) -> HealthMonitor:
    hm = HealthMonitor(**{"every_n_steps": 1, "dead_window": 2, "verbose": False, **monitor})
    pl.Trainer(callbacks=[hm], **trainer_kwargs(max_steps=steps, limit_val_batches=0)).fit(model, loader)
    return hm


def _first_batch_outputs(net: nn.Sequential, loader: DataLoader, upto: int = 2) -> torch.Tensor:
    """The activation's output on the first batch with the initial weights: step 0's reading."""
    x, _ = next(iter(loader))
    with torch.no_grad():
        return net[:upto](x)


def _kinds(hm: HealthMonitor, layer: str) -> set[str]:
    return {f.kind for f in hm.diagnose() if f.layer == layer}


# -- the probe on its own ------------------------------------------------------------------------------
def test_probe_reads_what_each_activation_computes():
    relu6 = activation_profile(nn.ReLU6())
    assert relu6.can_die and relu6.bounds == (0.0, 6.0) and relu6.saturation == (-math.inf, 6.0)
    gelu_tanh = activation_profile(transformers.activations.ACT2FN["gelu_pytorch_tanh"])
    assert gelu_tanh.off_side == "smooth" and gelu_tanh.bounds is None and gelu_tanh.saturation is None
    logsig = activation_profile(nn.LogSigmoid())
    assert logsig.range == (-math.inf, 0.0) and logsig.bounds is None and not logsig.rectifier
    assert logsig.saturation is not None and logsig.saturation[0] == -math.inf
    assert logsig.saturation[1] == pytest.approx(LOGSIGMOID_TOP, abs=1e-5)
    sig = activation_profile(nn.Sigmoid())
    assert sig.saturation == pytest.approx((SIGMOID_LOW, 1 - SIGMOID_LOW), abs=1e-5) and not sig.rectifier
    assert activation_profile(nn.Tanh()).saturation == pytest.approx((-TANH_EDGE, TANH_EDGE), abs=1e-5)
    assert activation_profile(nn.Hardtanh()).saturation == (-1.0, 1.0)  # exactly the flat values
    for smooth in (nn.GELU(), nn.SiLU(), nn.Mish(), nn.ELU(), nn.Softplus(), nn.SELU()):
        profile = activation_profile(smooth)
        assert profile.off_side == "smooth" and not profile.can_die and profile.rectifier, smooth
    for hard in (nn.ReLU(), nn.Hardswish(), nn.Hardsigmoid()):
        assert activation_profile(hard).can_die, hard
    for plain in (nn.LeakyReLU(), nn.PReLU(), nn.Identity(), nn.GLU(), nn.Softmax(-1), nn.Linear(4, 4)):
        profile = activation_profile(plain)
        assert not profile.can_die and profile.off_side is None and profile.saturation is None, plain


def test_probe_leaves_the_module_untouched():
    act = nn.PReLU()
    act.train()
    before = act.weight.detach().clone()
    activation_profile(act)
    assert act.training and torch.equal(act.weight, before) and act.weight.dtype == torch.float32


# -- case 3: semantics from behaviour --------------------------------------------------------------------
def test_gelu_pytorch_tanh_is_read_as_a_gelu_not_a_tanh():
    act = transformers.activations.ACT2FN["gelu_pytorch_tanh"]
    loader = _data()
    hm = _fit(Net(_mlp(act, weight_scale=6.0)), loader)  # large healthy pre-activations: many outputs > 1
    y = _first_batch_outputs(_mlp(act, weight_scale=6.0), loader)
    assert (y >= 0.98).float().mean() > 0.3  # what a (-1, 1) tanh reading would have called saturated
    assert all(v == 0.0 for _, v in hm.curves("saturation")["net.1"])
    assert "saturated" not in _kinds(hm, "net.1")
    assert hm.curves("act_max")["net.1"][0][1] == pytest.approx(y.max().item(), rel=1e-6)


def test_relu6_at_init_is_healthy_its_zero_side_is_not_saturation():
    loader = _data()
    hm = _fit(Net(_mlp(nn.ReLU6())), loader)
    y = _first_batch_outputs(_mlp(nn.ReLU6()), loader)
    assert (y == 0).float().mean() > 0.3  # half the outputs on the zero side, as ReLU's are
    assert hm.curves("saturation")["net.1"][0][1] == pytest.approx((y >= 6.0).float().mean().item())
    assert "saturated" not in _kinds(hm, "net.1")


def test_logsigmoid_is_not_read_as_a_sigmoid():
    loader = _data()
    hm = _fit(Net(_mlp(nn.LogSigmoid())), loader)
    y = _first_batch_outputs(_mlp(nn.LogSigmoid()), loader)
    reference = (y >= LOGSIGMOID_TOP).double().mean().item()
    assert hm.curves("saturation")["net.1"][0][1] == pytest.approx(reference, abs=1e-9)
    assert reference < 0.3 and "saturated" not in _kinds(hm, "net.1")


# -- case 4: the sigmoid's textbook saturation -------------------------------------------------------------
def test_sigmoid_outputs_at_one_to_four_percent_read_saturated():
    loader = _data()

    def net() -> nn.Sequential:
        return _mlp(nn.Sigmoid(), bias=-3.9, weight_scale=0.1)

    y = _first_batch_outputs(net(), loader)
    assert y.min().item() > 0.005 and y.max().item() < 0.045  # the layer sits at 1-4%
    hm = _fit(Net(net(), lr=1e-3), loader)
    first = hm.curves("saturation")["net.1"][0][1]
    assert first == pytest.approx(((y <= SIGMOID_LOW) | (y >= 1 - SIGMOID_LOW)).double().mean().item()) == 1.0
    saturated = [f for f in hm.diagnose() if f.layer == "net.1" and f.kind == "saturated"]
    assert saturated and saturated[0].severity == "warning"


# -- case 5: dead only where there is no gradient ---------------------------------------------------------
@pytest.mark.parametrize("act", [nn.GELU, nn.SiLU])
def test_smooth_rectifier_pushed_negative_is_inactive_not_dead(act):
    loader = _data()
    hm = _fit(Net(_mlp(act(), bias=-4.0, weight_scale=0.05)), loader)
    assert hm.curves("dead_fraction")["net.1"][-1][1] == 1.0  # no unit ever outputs > 0
    kinds = _kinds(hm, "net.1")
    assert "dead" not in kinds and "inactive" in kinds
    inactive = next(f for f in hm.diagnose() if f.kind == "inactive")
    assert inactive.severity == "warning" and "GELU" not in inactive.hint
    # its units still pass a gradient: the reading is not zero
    assert all(v > 0 for _, v in hm.curves("grad_norm")["net.1"])


def test_relu_pushed_negative_is_still_dead():
    hm = _fit(Net(_mlp(nn.ReLU(), bias=-4.0, weight_scale=0.05)), _data())
    dead = [f for f in hm.diagnose() if f.layer == "net.1" and f.kind == "dead"]
    assert dead and dead[0].severity == "critical"


class FunctionalMultiLabel(nn.Module):
    """F.relu between Linear layers (no activation module: the fallback), 6 labels, 3 of them rare."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden, self.head = nn.Linear(8, 16), nn.Linear(16, 6)
        with torch.no_grad():
            self.head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -6.0, -6.0, -6.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(x)))


def test_multilabel_head_with_negative_logits_is_not_dead():
    labels = torch.zeros(64, 6)
    labels[:, :3] = (torch.arange(64) % 2 == 0).float().unsqueeze(1)
    hm = _fit(Net(FunctionalMultiLabel(), multilabel=True), _data(labels=labels), steps=6)
    assert hm.monitored_layers == ["net.hidden", "net.head"]
    assert hm.curves("dead_fraction")["net.head"][-1][1] >= 0.5  # the rare labels' logits never go positive
    assert not [f for f in hm.diagnose() if f.kind in ("dead", "inactive")]


# -- case 2: recurrent layers and nn.TransformerEncoder with a padding mask --------------------------------
class Recurrent(pl.LightningModule):
    def __init__(self, kind: type[nn.RNNBase]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.rnn, self.head = nn.Embedding(20, 8), kind(8, 12, batch_first=True), nn.Linear(12, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _state = self.rnn(self.emb(ids))
        return self.head(out[:, -1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, y = batch
        return nn.functional.cross_entropy(self(ids), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_lstm_and_gru_outputs_are_read_by_default(kind):
    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 20, (32, 7), generator=g), torch.randint(0, 4, (32,), generator=g)
    loader = DataLoader(TensorDataset(ids, y), batch_size=8)
    model = Recurrent(kind)
    initial = copy.deepcopy(model)
    hm = _fit(model, loader, steps=3)
    assert hm.monitored_layers == ["rnn", "head"]
    with torch.no_grad():
        out, _ = initial.rnn(initial.emb(ids[:8]))
    assert [s for s, _ in hm.curves("act_std")["rnn"]] == [0, 1, 2]
    assert hm.curves("act_mean")["rnn"][0][1] == pytest.approx(out.mean().item(), rel=1e-5)
    assert all(v > 0 for _, v in hm.curves("grad_norm")["rnn"])
    assert activation_profile(model.rnn).bounds == (-1.0, 1.0)


class Encoder(pl.LightningModule):
    """Token ids -> nn.TransformerEncoder (functional ReLU feed-forward) with a padding mask -> a class."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(30, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.enc(self.emb(ids), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        return self.head((h * keep).sum(1) / keep.sum(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, pad, y = batch
        return nn.functional.cross_entropy(self(ids, pad), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        ids, pad, _y = batch
        self(ids, pad)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _padded_tokens(n: int = 24) -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 30, (n, 9), generator=g)
    lengths = torch.randint(3, 10, (n,), generator=g)
    pad = torch.arange(9).unsqueeze(0) >= lengths.unsqueeze(1)  # True at padding, left-aligned tokens
    return TensorDataset(ids.masked_fill(pad, 0), pad, torch.randint(0, 3, (n,), generator=g))


def test_transformer_encoder_with_padding_mask_keeps_every_layer_reporting():
    data = _padded_tokens()
    train, val = DataLoader(data, batch_size=8), DataLoader(data, batch_size=12)
    model = Encoder()
    hm = HealthMonitor(every_n_steps=1, dead_window=2, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "stopped reading" or "never ran" would fail here
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*enable_nested_tensor.*")
        pl.Trainer(callbacks=[hm], **trainer_kwargs(max_epochs=2)).fit(model, train, val)
    ff = ["enc.layers.0.dropout", "enc.layers.1.dropout"]
    assert hm.monitored_layers == ff and not any("out_proj" in n for n in hm.monitored_layers)
    for layer in ff:
        assert [s for s, _ in hm.curves("act_std")[layer]] == [0, 1, 2, 3, 4, 5]  # 3 batches x 2 epochs
        assert hm.curves("act_min")[layer][0][1] == 0.0  # ReLU outputs, not linear1's pre-activations
        assert [s for s, _ in hm.curves("val_dead_fraction")[layer]] == [3, 6]
    # the last validation's dead fraction, recomputed by hand on the real tokens (fast path off, no nesting)
    ids, pad, _ = data.tensors
    fired: dict[int, torch.Tensor] = {}
    hooks = [
        model.enc.layers[i].linear1.register_forward_hook(
            lambda m, a, out, i=i: fired.__setitem__(i, (torch.relu(out)[~pad] > 0).any(0))
        )
        for i in range(2)
    ]
    model.eval()
    with torch.no_grad():
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            model(ids, pad)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
            for h in hooks:
                h.remove()
    for i, layer in enumerate(ff):
        expected = 1.0 - fired[i].float().mean().item()
        assert hm.curves("val_dead_fraction")[layer][-1][1] == pytest.approx(expected)


def test_a_module_that_never_reports_is_dropped_with_one_note():
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.fc = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x.unsqueeze(1)
            return self.fc(self.attn(h, h, h, need_weights=False)[0][:, 0])

    torch.manual_seed(0)
    model = Net(Attention())
    assert [x.name for x in select_layers(model, nn.Linear)] == ["net.attn.out_proj", "net.fc"]
    with pytest.warns(RuntimeWarning, match=r"`net.attn.out_proj` never ran") as caught:
        hm = _fit(model, _data(), steps=4, layers=nn.Linear)
    assert len([w for w in caught if "never ran" in str(w.message)]) == 1
    assert hm.monitored_layers == ["net.fc"]
    assert [s for s, _ in hm.curves("act_std")["net.fc"]] == [0, 1, 2, 3]


# -- the table in docs/readings.md is what the probe reads ---------------------------------------------------
def test_activation_table_in_the_docs_matches_the_probe():
    from pathlib import Path

    from lightning_health.capture import catalog

    doc = (Path(__file__).resolve().parents[1] / "docs" / "readings.md").read_text(encoding="utf-8")
    start, end = doc.index(catalog.START), doc.index(catalog.END)
    documented = doc[start:end].splitlines()[3:]  # after the marker and the two header lines
    label = lambda line: line.split(" | ")[0]  # noqa: E731
    probed = {label(line): line for line in catalog.rows()}
    for line in documented:  # a row of a library that is not installed here is not checked
        assert probed.get(label(line), line) == line
    torch_rows = [line for line in probed.values() if line.startswith("| `nn.")]
    assert torch_rows and all(line in documented for line in torch_rows)
    assert doc[start:end].splitlines()[1:3] == catalog.HEADER.splitlines()
