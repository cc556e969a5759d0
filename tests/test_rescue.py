"""Rescue machinery: recycling dead units (ReDo) and swapping activations.

The acceptance bound for the loss at the moment of a reset: recycling dead units zeroes their
outgoing weights, so a unit that contributed ``w * 0`` now contributes ``0 * a`` and the network's
output is unchanged. We assert ``|loss_after - loss_before| <= 1e-6 * max(1, |loss_before|)``; in
practice the difference is exactly 0.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_health.readings.dormancy import dormant_mask, unit_abs_sums, unit_counts
from lightning_health.rescue import find_units_weights, reinit_dead_units, replace_activation

LOSS_JUMP_BOUND = 1e-6


def _data(n: int = 256, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.sin(x[:, :1] * 2) + x[:, 1:2] ** 2 - x[:, 2:3]
    return x, y


def _dead_fraction(model: nn.Sequential, act: str, x: torch.Tensor) -> float:
    """Fraction of units of activation `act` that never output > 0 on the whole of `x`."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(act).register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    a = seen[0]
    return dormant_mask(unit_abs_sums(a), unit_counts(a), tau=0.0).float().mean().item()


def _train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    loss = torch.tensor(0.0)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    return loss.item()


def _snapshot(opt: torch.optim.Optimizer) -> dict[int, dict[str, torch.Tensor]]:
    return {id(p): {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)} for p, s in opt.state.items()}


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))


def test_dead_layer_recovers_without_a_loss_jump_and_other_state_is_untouched() -> None:
    x, y = _data()
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, x, y, steps=5)  # Adam state exists for every parameter
    with torch.no_grad():
        model[0].bias[:32] = -50.0  # kill half of the first hidden layer
    _train(model, opt, x, y, steps=5)
    before = _dead_fraction(model, "1", x)
    assert before >= 0.4

    with torch.no_grad():
        seen: list[torch.Tensor] = []
        h = model[1].register_forward_hook(lambda _m, _i, out: seen.append(out))
        loss_before = nn.functional.mse_loss(model(x), y).item()
        h.remove()
    a = seen[0]
    dead = dormant_mask(unit_abs_sums(a), unit_counts(a), tau=0.0)
    state_before = _snapshot(opt)
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps_before = {id(p): s["step"].clone() for p, s in opt.state.items()}

    w = find_units_weights(model, "1")
    n = reinit_dead_units(w.layer_in, w.layer_out, dead, optimizer=opt, generator=torch.Generator().manual_seed(0))
    assert n == int(dead.sum()) >= 26

    with torch.no_grad():
        loss_after = nn.functional.mse_loss(model(x), y).item()
    assert abs(loss_after - loss_before) <= LOSS_JUMP_BOUND * max(1.0, abs(loss_before))
    assert _dead_fraction(model, "1", x) < 0.1  # fresh incoming weights fire at once

    # Parameters: exactly the masked rows/columns changed.
    p_now = dict(model.named_parameters())
    assert torch.equal(p_now["0.weight"][~dead], params_before["0.weight"][~dead])
    assert torch.equal(p_now["0.bias"][~dead], params_before["0.bias"][~dead])
    assert torch.all(p_now["0.bias"][dead] == 0)
    assert not torch.equal(p_now["0.weight"][dead], params_before["0.weight"][dead])
    assert torch.equal(p_now["2.weight"][:, ~dead], params_before["2.weight"][:, ~dead])
    assert torch.all(p_now["2.weight"][:, dead] == 0)
    for name in ("2.bias", "4.weight", "4.bias"):
        assert torch.equal(p_now[name], params_before[name])

    # Optimizer state: masked entries zeroed, every other entry bit-identical, `step` unchanged.
    s_in_w, s_in_b, s_out_w = (opt.state[model[0].weight], opt.state[model[0].bias], opt.state[model[2].weight])
    for key in ("exp_avg", "exp_avg_sq"):
        old = state_before[id(model[0].weight)][key]
        assert torch.equal(s_in_w[key][~dead], old[~dead]) and torch.all(s_in_w[key][dead] == 0)
        old = state_before[id(model[0].bias)][key]
        assert torch.equal(s_in_b[key][~dead], old[~dead]) and torch.all(s_in_b[key][dead] == 0)
        old = state_before[id(model[2].weight)][key]
        assert torch.equal(s_out_w[key][:, ~dead], old[:, ~dead]) and torch.all(s_out_w[key][:, dead] == 0)
    for p in (model[2].bias, model[4].weight, model[4].bias):
        for key, old in state_before[id(p)].items():
            assert torch.equal(opt.state[p][key], old)
    for p, s in opt.state.items():
        assert torch.equal(s["step"], steps_before[id(p)])

    # A few more steps: the recycled units stay alive and learn.
    _train(model, opt, x, y, steps=10)
    after = _dead_fraction(model, "1", x)
    assert after < 0.1
    assert not torch.all(model[2].weight[:, dead] == 0)  # outgoing weights grew from zero


def test_conv_with_batchnorm_and_depthwise_consumer_keeps_the_function() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout2d(0.0),
        nn.Conv2d(8, 16, 3, padding=1, groups=8),  # depthwise-multiplier 2: grouped in-channels
        nn.ReLU(),
        nn.Conv2d(16, 4, 1),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(16, 3, 8, 8)
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        model[1].bias[[1, 4, 6]] = -100.0  # BN's shift kills three channels
    model.eval()
    dead = torch.zeros(8, dtype=torch.bool)
    dead[[1, 4, 6]] = True
    with torch.no_grad():
        out_before = model(x)
    momentum_before = {id(p): opt.state[p]["momentum_buffer"].clone() for p in model.parameters()}

    w = find_units_weights(model, "2")
    assert (w.layer_in_name, w.layer_out_name, w.norm_names) == ("0", "5", ("1",))
    assert reinit_dead_units(w.layer_in, w.layer_out, dead, optimizer=opt, norms=w.norms, init="kaiming") == 3

    with torch.no_grad():
        out_after = model(x)
    assert (out_after - out_before).abs().max().item() <= 1e-6
    bn = model[1]
    assert torch.all(bn.weight[dead] == 1) and torch.all(bn.bias[dead] == 0)
    assert torch.all(bn.running_mean[dead] == 0) and torch.all(bn.running_var[dead] == 1)
    # Grouped consumer: out-channels 2c and 2c+1 read in-channel c through local column 0.
    zeroed = dead.repeat_interleave(2)
    assert torch.all(model[5].weight[zeroed] == 0)
    for p in model.parameters():
        new, old = opt.state[p]["momentum_buffer"], momentum_before[id(p)]
        if p is model[0].weight or p is model[0].bias or p is bn.weight or p is bn.bias:
            assert torch.equal(new[~dead], old[~dead]) and torch.all(new[dead] == 0)
        elif p is model[5].weight:
            assert torch.equal(new[~zeroed], old[~zeroed]) and torch.all(new[zeroed] == 0)
        else:
            assert torch.equal(new, old)
    model.train()
    with torch.no_grad():
        fired = (model[:3](x) > 0).flatten(2).any(-1).any(0)
    assert fired[dead].all()


def test_dormant_unit_changes_the_output_by_exactly_its_removed_contribution() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.GELU(), nn.Linear(6, 2))
    x = torch.randn(32, 3)
    with torch.no_grad():
        model[0].weight[2] *= 1e-3  # unit 2 barely moves: GELU(~b) is small but not zero
        model[0].bias[2] = -3.0
        a = model[1](model[0](x))
        contribution = a[:, 2:3] * model[2].weight[:, 2]
        out_before = model(x)
    dormant = dormant_mask(unit_abs_sums(a), unit_counts(a), tau=0.025)
    assert dormant.tolist() == [False, False, True, False, False, False]
    assert dormant_mask(unit_abs_sums(a), unit_counts(a), tau=0.0).sum().item() == 0  # not dead
    reinit_dead_units(model[0], model[2], dormant, init="kaiming")
    with torch.no_grad():
        out_after = model(x)
    torch.testing.assert_close(out_before - out_after, contribution, atol=1e-6, rtol=0)


def test_same_seed_gives_identical_weights_on_every_replica() -> None:
    a, b = _mlp(), _mlp()
    dead = torch.arange(64) % 3 == 0
    for m in (a, b):
        reinit_dead_units(m[0], m[2], dead, generator=torch.Generator().manual_seed(123))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize(("init", "bound"), [("kaiming", (6 / 512) ** 0.5), ("xavier", (6 / (512 + 256)) ** 0.5)])
def test_init_distributions(init: str, bound: float) -> None:
    layer_in, layer_out = nn.Linear(512, 256), nn.Linear(256, 4)
    dead = torch.ones(256, dtype=torch.bool)
    reinit_dead_units(layer_in, layer_out, dead, init=init, generator=torch.Generator().manual_seed(0))  # type: ignore[arg-type]
    w = layer_in.weight.detach()
    assert w.abs().max().item() <= bound
    assert w.var().item() == pytest.approx(bound**2 / 3, rel=0.02)  # uniform(-b, b) has variance b^2 / 3
    assert torch.all(layer_in.bias == 0) and torch.all(layer_out.weight == 0)


def test_bf16_weights_and_stale_grads() -> None:
    layer_in, layer_out = nn.Linear(4, 6).to(torch.bfloat16), nn.Linear(6, 2).to(torch.bfloat16)
    layer_out(torch.relu(layer_in(torch.randn(3, 4, dtype=torch.bfloat16)))).sum().backward()
    assert layer_in.weight.grad is not None and layer_out.weight.grad is not None
    grad_out = layer_out.weight.grad.clone()
    dead = torch.tensor([True, False, False, True, False, False])
    assert reinit_dead_units(layer_in, layer_out, dead) == 2
    assert layer_in.weight.dtype == torch.bfloat16
    assert torch.all(layer_in.weight.grad[dead] == 0) and torch.all(layer_out.weight.grad[:, dead] == 0)
    assert torch.equal(layer_out.weight.grad[:, ~dead], grad_out[:, ~dead])


def test_empty_mask_changes_nothing() -> None:
    m = _mlp()
    before = copy.deepcopy(m.state_dict())
    assert reinit_dead_units(m[0], m[2], torch.zeros(64, dtype=torch.bool)) == 0
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_unindexable_optimizer_state_is_refused_before_any_change() -> None:
    m = _mlp()
    opt = torch.optim.Adam(m.parameters())
    opt.state[m[0].weight]["row_var"] = torch.zeros(64, 1)  # factored state, as Adafactor keeps
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match=r"keeps `row_var` with shape \(64, 1\).*optimizer=None"):
        reinit_dead_units(m[0], m[2], torch.ones(64, dtype=torch.bool), optimizer=opt)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_reinit_argument_errors() -> None:
    lin_in, lin_out = nn.Linear(4, 6), nn.Linear(6, 2)
    mask = torch.ones(6, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"Expected `layer_in` to be an nn.Linear or nn.Conv1d/2d/3d, got ReLU"):
        reinit_dead_units(nn.ReLU(), lin_out, mask)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Expected `layer_out` .* got ConvTranspose2d"):
        reinit_dead_units(lin_in, nn.ConvTranspose2d(6, 2, 3), mask)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Expected `dead_mask` to be a bool tensor, got Tensor torch.int64"):
        reinit_dead_units(lin_in, lin_out, torch.ones(6, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"Expected `dead_mask` to have shape \(6,\).*got \(5,\)"):
        reinit_dead_units(lin_in, lin_out, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"Expected `layer_out` to read the 6 units .* takes 12 .*Flatten"):
        reinit_dead_units(lin_in, nn.Linear(12, 2), mask)
    with pytest.raises(ValueError, match=r"Expected `init` to be one of"):
        reinit_dead_units(lin_in, lin_out, mask, init="orthogonal")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Expected `norms\[0\]` to be a BatchNorm layer, got LayerNorm"):
        reinit_dead_units(lin_in, lin_out, mask, norms=[nn.LayerNorm(6)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"Expected `norms\[0\]` to have 6 features"):
        reinit_dead_units(lin_in, lin_out, mask, norms=[nn.BatchNorm1d(5)])
    with pytest.raises(ValueError, match=r"Expected `layer_in` to be materialised"):
        reinit_dead_units(nn.LazyLinear(6), lin_out, mask)
    with pytest.raises(ValueError, match=r"Expected `layer_in` to own its weight.*parametrized"):
        reinit_dead_units(nn.utils.parametrizations.weight_norm(nn.Linear(4, 6)), lin_out, mask)


class _Wrapper(nn.Module):
    """A LightningModule-like owner: names are prefixed with `net.`."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_find_units_weights_across_nested_sequentials() -> None:
    block = lambda i, o: nn.Sequential(nn.Linear(i, o), nn.BatchNorm1d(o), nn.GELU())  # noqa: E731
    model = _Wrapper(nn.Sequential(block(4, 8), nn.Sequential(nn.Dropout(0.1), block(8, 8)), nn.Linear(8, 1)))
    first = find_units_weights(model, "net.0.2")
    assert (first.layer_in_name, first.norm_names, first.layer_out_name) == ("net.0.0", ("net.0.1",), "net.1.1.0")
    assert first.layer_in is model.net[0][0] and first.layer_out is model.net[1][1][0]
    second = find_units_weights(model, "net.1.1.2")
    assert (second.layer_in_name, second.layer_out_name) == ("net.1.1.0", "net.2")


def test_find_units_weights_in_a_modulelist_of_sequentials() -> None:
    model = nn.ModuleList([nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.AvgPool1d(2), nn.Conv1d(4, 4, 1))])
    w = find_units_weights(model, "0.1")
    assert (w.layer_in_name, w.layer_out_name, w.norm_names) == ("0.0", "0.3", ())


class _Residual(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize(
    ("model", "name", "match"),
    [
        (_Custom(), "act", r"its parent `<model>` \(_Custom\) is not an nn.Sequential"),
        (_Wrapper(_Custom()), "net.act", r"its parent `net` \(_Custom\) is not an nn.Sequential"),
        (
            nn.Sequential(nn.Linear(2, 4), _Residual(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))),
            "1.1",
            r"its parent `1` \(_Residual\) is not an nn.Sequential with Sequential's own forward",
        ),
        (
            nn.Sequential(nn.Linear(4, 4), nn.ReLU(), _Residual(nn.Linear(4, 4))),
            "1",
            r"`2` \(_Residual\) mixes units or is opaque",
        ),
        (
            nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 1)),
            "2",
            r"`1` \(LayerNorm\) mixes units or is opaque",
        ),
        (
            nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 1)),
            "1",
            r"`2` \(Flatten\) mixes units",
        ),
        (nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Softmax(-1)), "1", r"`2` \(Softmax\) mixes units"),
        (nn.Sequential(nn.Linear(2, 4), nn.ReLU()), "1", "no Linear or Conv layer after it.*feeds the output"),
        (nn.Sequential(nn.ReLU(), nn.Linear(2, 4)), "0", "no Linear or Conv layer before it"),
        (
            nn.Sequential(nn.ConvTranspose2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 1, 1)),
            "1",
            r"`0` \(ConvTranspose2d\) is a transposed convolution",
        ),
        (nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1)), "0", "Expected `activation_name` to name an act"),
    ],
)
def test_find_units_weights_refuses_clearly(model: nn.Module, name: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        find_units_weights(model, name)


def test_find_units_weights_unknown_name() -> None:
    with pytest.raises(KeyError, match=r"Expected `activation_name` to name a submodule"):
        find_units_weights(_mlp(), "7")


def _zoo() -> nn.Module:
    torch.manual_seed(0)
    shared = nn.ReLU()
    return nn.Sequential(
        nn.Linear(3, 5),
        shared,
        nn.ModuleDict({"inner": nn.Sequential(nn.Linear(5, 5), nn.ReLU())}),
        nn.ModuleList([shared, nn.Tanh()]),
    )


def test_replace_activation_everywhere_and_round_trip() -> None:
    model = _zoo()
    x = torch.randn(4, 3)

    def run(m: nn.Module) -> torch.Tensor:
        h = m[2]["inner"](m[1](m[0](x)))
        return m[3][1](m[3][0](h))

    reference = run(model)
    assert replace_activation(model, nn.ReLU, lambda: nn.LeakyReLU(0.2)) == ["1", "2.inner.1", "3.0"]
    assert isinstance(model[1], nn.LeakyReLU) and isinstance(model[2]["inner"][1], nn.LeakyReLU)
    assert model[1] is not model[3][0]  # a shared module gets one new module per place
    assert isinstance(model[3][1], nn.Tanh)
    assert replace_activation(model, nn.LeakyReLU, nn.ReLU) == ["1", "2.inner.1", "3.0"]
    assert torch.equal(run(model), reference)
    assert not any(isinstance(m, nn.LeakyReLU) for m in model.modules())


def test_replace_activation_by_name_keeps_mode() -> None:
    model = _zoo().eval()
    assert replace_activation(model, nn.ReLU, nn.GELU, names=["2.inner.1"]) == ["2.inner.1"]
    assert isinstance(model[2]["inner"][1], nn.GELU) and not model[2]["inner"][1].training
    assert isinstance(model[1], nn.ReLU)


def test_leaky_swap_gives_dead_units_a_gradient() -> None:
    model = _mlp()
    with torch.no_grad():
        model[0].bias[:32] = -50.0
    x, y = _data()
    nn.functional.mse_loss(model(x), y).backward()
    assert torch.all(model[0].bias.grad[:32] == 0)
    model.zero_grad()
    replace_activation(model, nn.ReLU, lambda: nn.LeakyReLU(0.01), names=["1"])
    nn.functional.mse_loss(model(x), y).backward()
    assert torch.all(model[0].bias.grad[:32] != 0)


def test_replace_activation_errors() -> None:
    model = _zoo()
    with pytest.raises(ValueError, match=r"Expected `names` to name submodules of the model, but \['9'\]"):
        replace_activation(model, nn.ReLU, nn.GELU, names=["9"])
    with pytest.raises(ValueError, match=r"Expected `names` to name modules of type .*ReLU.*\['0'\]"):
        replace_activation(model, nn.ReLU, nn.GELU, names=["0"])
    with pytest.raises(TypeError, match=r"Expected `new_factory` to return an nn.Module, got builtin"):
        replace_activation(model, nn.ReLU, lambda: torch.relu)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match=r"Cannot replace the model itself \(ReLU\)"):
        replace_activation(nn.ReLU(), nn.ReLU, nn.GELU)
