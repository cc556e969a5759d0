"""The rescue policy the monitor calls: mapping, deterministic application, events."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_health.rescue.policy import RescueEvent, RescuePolicy


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2), nn.ReLU()
    )


def _mask(n: int, *idx: int) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[list(idx)] = True
    return m


def test_reinit_events_and_refusals() -> None:
    net = _net()
    opt = torch.optim.AdamW(net.parameters())
    policy = RescuePolicy("reinit", seed=1)
    refused = policy.prepare(net, ["2", "4", "6"])
    assert list(refused) == ["6"] and "no Linear or Conv layer after it" in refused["6"]
    events = policy.apply(net, {"2": _mask(8, 0, 3), "4": _mask(8), "6": _mask(2, 0)}, step=30, optimizers=[opt])
    assert events == [RescueEvent(30, "2", "reinit", (0, 3), ("0", "3", "1"))]
    assert str(events[0]) == (
        "step 30: reinit 2 unit(s) of `2` [0, 3]: fresh rows of `0`, zeroed columns of `3`, reset entries of `1`"
    )
    assert torch.all(net[3].weight[:, [0, 3]] == 0)


def test_every_replica_gets_the_identical_change() -> None:
    replicas = [_net(0), _net(0)]
    for net in replicas:
        policy = RescuePolicy("reinit", init="xavier", seed=7)
        policy.prepare(net, ["2", "4"])
        policy.apply(net, {"2": _mask(8, 1, 2, 5), "4": _mask(8, 7)}, step=100)
    a, b = replicas
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    c = _net(0)
    policy = RescuePolicy("reinit", init="xavier", seed=7)
    policy.prepare(c, ["2"])
    policy.apply(c, {"2": _mask(8, 1, 2, 5)}, step=101)  # another step draws other weights
    assert not torch.equal(c[0].weight, a[0].weight)


def test_leaky_replaces_relus_once() -> None:
    net = _net()
    policy = RescuePolicy("leaky", negative_slope=0.05)
    assert list(policy.prepare(net, ["2", "4"])) == ["4"]
    events = policy.apply(net, {"2": _mask(8, 4), "4": _mask(8, 1)}, step=10)
    assert [(e.layer, e.action, e.units) for e in events] == [("2", "leaky", (4,))]
    assert isinstance(net[2], nn.LeakyReLU) and net[2].negative_slope == 0.05
    assert str(events[0]).endswith("replaced by LeakyReLU(negative_slope=0.05)")
    assert policy.apply(net, {"2": _mask(8, 4)}, step=20) == []


def test_split_optimizers_are_refused() -> None:
    net = _net()
    opts = [torch.optim.SGD(net[:2].parameters(), lr=0.1), torch.optim.SGD(net[3:].parameters(), lr=0.1)]
    policy = RescuePolicy("reinit")
    policy.prepare(net, ["2"])
    with pytest.raises(ValueError, match=r"`0` and `3` are trained by different optimizers"):
        policy.apply(net, {"2": _mask(8, 0)}, step=0, optimizers=opts)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "prune"}, r"Expected `rescue` to be None or one of \('reinit', 'leaky'\), got 'prune'"),
        ({"mode": "reinit", "init": "normal"}, r"Expected `init` to be 'kaiming', 'xavier' or 'auto', got 'normal'"),
        ({"mode": "leaky", "negative_slope": 1.5}, r"Expected `negative_slope` to be in \(0, 1\), got 1.5"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RescuePolicy(**kwargs)  # type: ignore[arg-type]
