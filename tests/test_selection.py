"""Which layers are read, and along which axis units lie."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_health.capture.selection import activation_profile, is_activation_module, select_layers


class ThirdPartyGELU(nn.Module):
    """Like transformers' GELUActivation: not a torch.nn activation subclass."""

    def forward(self, x):
        return nn.functional.gelu(x)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = ThirdPartyGELU()

    def forward(self, x):
        return self.act(self.fc(x))


def test_default_selects_activation_modules_including_third_party():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Block(), nn.Tanh(), nn.Softmax(-1))
    names = [layer.name for layer in select_layers(model)]
    assert names == ["1", "2.act", "3"]


def test_fallback_to_linear_and_conv_when_model_uses_functional_activations():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    layers = select_layers(Functional())
    assert [(layer.name, layer.neuron_dim) for layer in layers] == [("conv", 1), ("fc", -1)]


def test_selection_by_type_pattern_names_and_predicate():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh())
    assert [x.name for x in select_layers(model, nn.Linear)] == ["0", "2"]
    assert [x.name for x in select_layers(model, (nn.ReLU, nn.Tanh))] == ["1", "3"]
    assert [x.name for x in select_layers(model, r"^[13]$")] == ["1", "3"]
    assert [x.name for x in select_layers(model, ["2"])] == ["2"]
    assert [x.name for x in select_layers(model, lambda n, m: n == "3")] == ["3"]
    assert [x.name for x in select_layers(model, [nn.ReLU, nn.Tanh])] == ["1", "3"]  # a list of types, as a tuple
    assert [x.name for x in select_layers(model, [nn.Tanh, "0"])] == ["0", "3"]  # names and types mixed


def test_conv_feature_maps_use_the_channel_axis():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4), nn.ReLU())
    dims = {x.name: x.neuron_dim for x in select_layers(model)}
    assert dims == {"2": 1, "5": -1}
    assert {x.name: x.neuron_dim for x in select_layers(model, neuron_dim={"5": 0})} == {"2": 1, "5": 0}


def test_profiles():
    assert activation_profile(nn.ReLU()).rectifier and activation_profile(nn.ReLU()).bounds is None
    assert activation_profile(nn.Tanh()).bounds == (-1.0, 1.0)
    assert activation_profile(nn.Sigmoid()).bounds == (0.0, 1.0)
    assert activation_profile(nn.ReLU6()).bounds == (0.0, 6.0)
    assert not activation_profile(nn.LeakyReLU()).rectifier
    assert activation_profile(ThirdPartyGELU()).rectifier
    assert not is_activation_module(nn.MultiheadAttention(4, 1))
    assert not is_activation_module(Block())


def test_bad_layer_spec_is_rejected_by_name():
    from lightning_health import HealthMonitor

    with pytest.raises(TypeError, match="`layers`"):
        HealthMonitor(layers=3.5)
    with pytest.raises(ValueError, match=r"`layers`.*regular expression"):
        HealthMonitor(layers="(unclosed")
    with pytest.raises(TypeError, match=r"`layers` to list module names or module types.*got 3 \(int\)"):
        HealthMonitor(layers=["fc", 3])
    monitor = HealthMonitor(layers=(name for name in ["1", "3"]))  # a generator: read once, kept as a list
    assert monitor.layers == ["1", "3"]
