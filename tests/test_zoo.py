"""The diagnosis on the architectures users train: silent on healthy runs, the right finding on sick ones.

Every case is a real ``Trainer`` fit of a model from ``tests/zoo_models.py`` (code or a ``transformers``
config, random weights, generated or scikit-learn data). A healthy case must learn (its loss falls) and
get no warning and no critical finding at all; a sick case is dosed with a known cause from the
literature and must get the finding that names it, on the layer where it is. The two lists are the
contract of "no false alarm, no missed disease" (issue 11).
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import zoo_models as zoo
from torch import nn

from lightning_health import HealthMonitor
from lightning_health.diagnosis import Thresholds
from lightning_health.diagnosis.learning import UpdateWindow
from lightning_health.diagnosis.rules import evaluate

STEPS = 60


def _fit(task: zoo.Task, loader, steps: int = STEPS, every: int = 2) -> HealthMonitor:
    monitor = HealthMonitor(every_n_steps=every, verbose=False)
    trainer = pl.Trainer(
        max_steps=steps, callbacks=[monitor], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, accelerator="cpu", devices=1,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's data-loader and logging advice
        trainer.fit(task, loader)
    return monitor


HEALTHY = {
    "relu_mlp": lambda: zoo.digits_mlp(),
    "resnet_cnn_sgd": lambda: zoo.digits_cnn(),
    "lstm": lambda: zoo.recurrent(nn.LSTM),
    "gru": lambda: zoo.recurrent(nn.GRU),
    "transformer_encoder_padded": lambda: zoo.encoder(),
    "gpt2": lambda: zoo.hf_lm("gpt2"),
    "llama": lambda: zoo.hf_lm("llama"),
    "gemma_gelu_tanh": lambda: zoo.hf_lm("gemma"),
    "t5": lambda: zoo.hf_lm("t5"),
    "bert_masked_lm": lambda: zoo.hf_lm("bert"),
    "multilabel_head": lambda: zoo.multilabel(),
    "autoencoder_sigmoid_bce": lambda: zoo.autoencoder(nn.Sigmoid),
    "autoencoder_tanh_mse": lambda: zoo.autoencoder(nn.Tanh),
}


@pytest.mark.parametrize("case", sorted(HEALTHY))
def test_a_healthy_run_learns_and_gets_no_finding(case):
    task, loader = HEALTHY[case]()
    monitor = _fit(task, loader)
    first, last = sum(task.losses[:5]) / 5, sum(task.losses[-5:]) / 5
    assert last < first, f"the healthy {case} did not learn ({first:.3f} -> {last:.3f}): not a healthy case"
    assert monitor.curves("act_std"), "nothing was read"
    raised = [(f.layer, f.kind, f.message) for f in monitor.diagnose() if f.severity in ("warning", "critical")]
    assert not raised, f"false alarm on a healthy {case}: {raised}"


def test_an_output_activation_is_found_from_the_graph_and_judged_as_a_head():
    """The autoencoder's Sigmoid feeds the loss through no weight: it is the head. Its background
    pixels at 0 are its prediction (not saturation), and its gradient, BCE's 1/(p(1-p)), is no
    reference for the hidden layer's."""
    task, loader = zoo.autoencoder(nn.Sigmoid)
    monitor = _fit(task, loader)
    assert monitor._record.heads == {"net.3"}
    assert max(v for _, v in monitor.curves("saturation")["net.3"]) > 0.3  # it does sit at its limit
    assert not [f for f in monitor.diagnose() if f.kind in ("saturated", "vanishing_gradient", "gradient_flow")]


def test_a_gan_with_two_toggled_optimizers_gets_no_finding():
    """Manual optimization, D then G: each optimizer's modules are read around its own step (G's weights
    moved, though they were frozen during D's step), and G's Tanh, behind the frozen D in G's step, is a head."""
    module, loader = zoo.gan()
    monitor = _fit(module, loader, steps=240)
    assert "G.3" in monitor._record.heads
    assert min(v for _, v in monitor.curves("update_ratio")["G.0"]) > 0
    raised = [(f.layer, f.kind, f.message) for f in monitor.diagnose() if f.severity in ("warning", "critical")]
    assert not raised


def test_output_heads_stop_at_every_learned_weight():
    from lightning_health.capture.heads import output_heads

    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Sigmoid(), nn.Linear(8, 3), nn.ReLU())
    nodes = {}
    for i in (1, 3, 5):
        net[i].register_forward_hook(lambda m, a, out, i=i: nodes.update({i: [out.grad_fn]}))
    y = net(torch.randn(4, 6))
    loss = (y - 1).square().mean() + 1e-4 * net[0].weight.square().sum()  # weight decay in the loss
    assert output_heads(loss, nodes) == {5}
    net[4].weight.requires_grad_(False)  # frozen for this backward: part of the loss, so net.3 is a head too
    net[4].bias.requires_grad_(False)
    y = net(torch.randn(4, 6))
    nodes = {i: nodes[i][-1:] for i in nodes}
    assert output_heads((y - 1).square().mean(), nodes) == {3, 5}
    assert output_heads(y.detach().sum(), nodes) == set()  # no graph: no head


def _kinds(monitor: HealthMonitor) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in monitor.diagnose():
        out.setdefault(f.kind, set()).add(f.layer)
    return out


def test_relus_pushed_off_by_a_negative_bias_are_dead():
    monitor = _fit(*zoo.digits_mlp(depth=3, bias=-3.0))
    found = {f.layer: f for f in monitor.diagnose() if f.kind == "dead"}
    assert {"net.1", "net.3", "net.5"} <= set(found)
    assert any(f.peak_severity == "critical" for f in found.values())


def test_a_deep_sigmoid_net_at_unit_normal_init_saturates():
    """Glorot & Bengio (2010): sigmoid layers at a large init sit on their flat shoulders."""
    monitor = _fit(*zoo.digits_mlp(nn.Sigmoid, init="normal", depth=6))
    saturated = _kinds(monitor).get("saturated", set())
    assert len(saturated) >= 4 and saturated <= {f"net.{2 * i + 1}" for i in range(6)}


def test_sgd_at_a_huge_learning_rate_explodes():
    monitor = _fit(*zoo.digits_mlp(optim=zoo.sgd(lr=10.0)))
    kinds = _kinds(monitor)
    assert kinds.get("exploding_gradient") or kinds.get("nonfinite")
    assert any(f.peak_severity == "critical" for f in monitor.diagnose())


def test_a_deep_tanh_net_initialised_too_small_vanishes_and_recovering_is_not_exploding():
    """At std 0.05 ten tanh layers pass almost no gradient back; as the weights grow the early layers'
    gradients rise 1e5-fold towards the output side's level: recovery, not an explosion."""
    task, loader = zoo.digits_mlp(nn.Tanh, depth=10, width=32)
    for m in task.net:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.05)
    monitor = _fit(task, loader)
    kinds = _kinds(monitor)
    assert {"net.1", "net.3", "net.5"} <= kinds.get("vanishing_gradient", set())
    grad = dict(monitor.curves("grad_std")["net.1"])
    assert max(grad.values()) > 1e4 * grad[0]  # it really rose that much
    assert "exploding_gradient" not in kinds


def test_a_layer_left_out_of_the_optimizer_is_stalled_and_only_it():
    task, loader = zoo.digits_mlp(depth=3)
    task.params_for_optimizer = [p for name, p in task.net.named_parameters() if not name.startswith("2.")]
    monitor = _fit(task, loader)
    assert _kinds(monitor).get("stalled") == {"net.2"}


@pytest.mark.parametrize("model", ["mlp", "gpt2"])
def test_adam_at_learning_rate_one_is_unstable(model):
    monitor = _fit(*(zoo.digits_mlp(optim=zoo.adam(1.0)) if model == "mlp" else zoo.hf_lm("gpt2", zoo.adam(1.0))))
    assert _kinds(monitor).get("unstable")


def test_a_zero_initialised_head_is_not_unstable_while_it_grows():
    """Its weights are its own few Adam steps: the ratio falls like 1/k whatever the learning rate."""
    task, loader = zoo.digits_mlp(depth=3)
    nn.init.zeros_(task.net[-1].weight)
    nn.init.zeros_(task.net[-1].bias)
    monitor = _fit(task, loader)
    ratios = dict(monitor.curves("update_ratio")["net.6"])
    assert ratios[2] > 0.1 and ratios[8] > 0.1  # above the threshold for the first sampled steps
    assert "unstable" not in _kinds(monitor)


def test_a_zero_initialised_module_is_judged_after_a_hundred_steps():
    window, t = UpdateWindow(2), Thresholds()
    window.add({"w": {"param_norm": 0.0, "update_ratio": float("nan"), "param_grad_norm": 1.0}}, step=0)
    for step in (50, 120):
        stats = window.add({"w": {"param_norm": 1.0, "update_ratio": 0.5, "param_grad_norm": 1.0}}, step=step)
        found, _ = evaluate(step, stats, t)
        assert [f.kind for f in found] == ([] if step < 100 else ["unstable"])
    restored = UpdateWindow(2)
    restored.load_state_dict(window.state_dict())
    assert restored.state_dict() == window.state_dict()
    old = UpdateWindow(2)  # a checkpoint written before the zero marks: {module: [ratios]}
    old.load_state_dict({"w": [0.5, 0.5]})
    assert old.state_dict() == {"ratios": {"w": [0.5, 0.5]}, "zero_at": {}, "gated_at": {}, "graded": ["w"]}


def test_a_stretch_that_always_shrinks_the_gradient_is_architecture_a_new_one_is_a_finding():
    """gradient_flow: a head's transform that shrinks the gradient 40x from step 0 is not news; a stretch
    whose gain falls 50x below its own early-run gain is, and so is one where a vanishing gradient starts."""
    from lightning_health.diagnosis import GradBaseline

    t, order = Thresholds(), ["a", "b"]
    gains = GradBaseline(t.baseline_samples, "grad_gain")
    for step in range(8):
        found, _ = evaluate(step, {"b": {"grad_gain": 0.025}}, t, layer_order=order, gain_baseline=gains)
        assert not found
    moved = GradBaseline(t.baseline_samples, "grad_gain")
    for step in range(5):
        evaluate(step, {"b": {"grad_gain": 1.0}}, t, layer_order=order, gain_baseline=moved)
    found, _ = evaluate(5, {"b": {"grad_gain": 0.02}}, t, layer_order=order, gain_baseline=moved)
    assert [f.kind for f in found] == ["gradient_flow"] and "(usually 1x)" in found[0].message
    located = GradBaseline(t.baseline_samples, "grad_gain")
    readings = {
        "a": {"grad_std": 1e-6, "grad_norm": 1e-6},
        "b": {"grad_std": 1.0, "grad_norm": 1.0, "grad_gain": 1e-6},
    }
    found, _ = evaluate(0, readings, t, layer_order=order, output_layer="b", gain_baseline=located)
    assert {(f.layer, f.kind) for f in found} == {("a", "vanishing_gradient"), ("b", "gradient_flow")}


def test_the_same_dose_on_a_summed_loss_gets_the_same_verdict():
    """Scale-free rules: a loss summed instead of averaged (learning rate scaled to match) is the same run."""

    def summed(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, y, reduction="sum")

    verdicts = []
    for loss, lr in ((nn.functional.cross_entropy, 10.0), (summed, 10.0 / 32)):
        task, loader = zoo.digits_mlp(optim=zoo.sgd(lr=lr))
        task.loss_fn = loss
        verdicts.append({(f.layer, f.kind) for f in _fit(task, loader, steps=20).diagnose()})
    assert verdicts[0] == verdicts[1] and verdicts[0]


def test_a_head_is_never_called_vanishing_for_being_smaller_than_the_layer_it_reads():
    """The reference for vanishing is the last layer before the heads; a head is output-side of it.
    A head with large weights (a high learning rate grew them, or an init scaled up) hands the LSTM
    a far larger gradient than it gets from the loss: that is gain, not a gradient lost on its way back."""
    task, loader = zoo.recurrent(nn.LSTM)
    with torch.no_grad():
        task.net.head.weight.mul_(300.0)
    monitor = _fit(task, loader, steps=20)
    assert "net.head" in monitor._record.heads
    head_grad = max(v for _, v in monitor.curves("grad_norm")["net.head"])
    rnn_grad = min(v for _, v in monitor.curves("grad_norm")["net.rnn"])
    assert head_grad < 1e-2 * rnn_grad  # the case the rule once got wrong: the head far below the reference
    assert not [f for f in monitor.diagnose() if f.layer == "net.head" and f.kind == "vanishing_gradient"]


def test_a_transformer_that_learns_sharp_attention_gets_no_attention_finding():
    """Learning to attend takes a head from uniform attention (its highest entropy) and logits near 0 at
    initialisation to a near one-hot copy head with logits of 10-30: the drop and the growth are
    learning. Only a whole layer gone one-hot, or logits past the bound, are findings."""
    task, loader = zoo.hf_lm("llama", zoo.adam(2e-3))
    monitor = _fit(task, loader, steps=240)
    first, last = sum(task.losses[:5]) / 5, sum(task.losses[-5:]) / 5
    assert last < 0.5 * first, "the copy task was not learned: not the case under test"
    layer = "net.model.model.layers.1.self_attn"
    sharpest = min(v for _, v in monitor.curves("attn_entropy_min")[layer])
    entropies = [v for _, v in monitor.curves("attn_entropy")[layer]]
    logits = [v for _, v in monitor.curves("attn_logit_max")[layer]]
    assert sharpest < 0.1 * entropies[0] and max(logits) > 50 * logits[0]  # a head went sharp; logits grew 50x+
    raised = [(f.layer, f.kind, f.message) for f in monitor.diagnose()]
    assert not [r for r in raised if r[1] in ("entropy_collapse", "logit_growth")], raised


CONFIDENT = {  # healthy fits whose tanh/sigmoid layers grow confident: 30-39% of outputs end on a shoulder
    "tanh_mlp": (lambda: zoo.digits_mlp(nn.Tanh, init="xavier", depth=3, width=128), 1500, "net.5"),
    "sigmoid_mlp": (lambda: zoo.digits_mlp(nn.Sigmoid, init="xavier", depth=3), 1000, "net.1"),
    "tanh_rnn": (lambda: zoo.recurrent(nn.RNN), 1000, "net.rnn"),
}


@pytest.mark.parametrize("case", sorted(CONFIDENT))
def test_a_layer_grown_confident_by_training_is_not_saturated(case):
    """Saturation that training builds (a minority of outputs on a shoulder, loss near 0) is not the
    Glorot & Bengio disease, where most of a layer sits there from its first readings."""
    build, steps, layer = CONFIDENT[case]
    task, loader = build()
    monitor = _fit(task, loader, steps, every=10)
    assert sum(task.losses[-20:]) / 20 < 0.25 * sum(task.losses[:20]) / 20, "not a fit that learned"
    assert max(v for _, v in monitor.curves("saturation")[layer]) > 0.3  # past the old 30% line
    assert not [f for f in monitor.diagnose() if f.kind == "saturated"], monitor.diagnose()


LONG_HEALTHY = {  # 400 steps, sampled every 2: spikes, and gates initialised at exactly 0 opening
    "resnet_cnn_sgd": lambda: zoo.digits_cnn(),
    "resnet_zero_init_residual": lambda: zoo.digits_cnn(zero_init_residual=True),
    "rezero_mlp": lambda: zoo.rezero_mlp(),
}


@pytest.mark.parametrize("case", sorted(LONG_HEALTHY))
def test_a_healthy_run_is_judged_against_its_usual_level_not_its_first_readings(case):
    """A BatchNorm ResNet under SGD grows its gradients ~5x after step 0 and spikes 30x for a batch
    (140x its first readings: 'critical' against an early baseline); behind a gate initialised at 0
    (torchvision's zero_init_residual, ReZero) gradients start at exactly 0 and open as the gate
    learns: neither vanishing, stalled nor exploding."""
    task, loader = LONG_HEALTHY[case]()
    monitor = _fit(task, loader, steps=400)
    assert sum(task.losses[-20:]) / 20 < 0.1 * sum(task.losses[:20]) / 20, "not a fit that learned"
    raised = [(f.layer, f.kind, f.message) for f in monitor.diagnose() if f.severity in ("warning", "critical")]
    assert not raised, f"false alarm on a healthy {case}: {raised}"


def test_a_constant_input_collapses_the_first_layer_whatever_share_of_it_died():
    """Every example is the same image: each ReLU unit of the first layer outputs one value for the whole
    batch. 59% of them are at exactly 0 (dead) and the other 41% constant: the layer is 100% collapsed
    among its live units, not '41% of units'."""

    class ConstantInput(zoo.Task):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return super().training_step((torch.full_like(x, 0.5), y), batch_idx)

    task, loader = zoo.digits_mlp()
    monitor = _fit(ConstantInput(task.net, task.loss_fn, zoo.adam()), loader, steps=40)
    assert 0 < min(v for _, v in monitor.curves("dead_fraction")["net.1"]) < 0.9  # some died, some live
    assert {"collapsed", "dead"} <= _kinds(monitor).keys() and "net.1" in _kinds(monitor)["collapsed"]


def _tiny_batch_mlp(bias: float = 0.0) -> tuple[zoo.Task, object]:
    torch.manual_seed(0)
    x, y = zoo.digits()
    net = zoo.mlp(nn.ReLU, (64, 256, 256, 10), bias=bias)
    return zoo.Task(net, nn.functional.cross_entropy, zoo.adam()), zoo._loader(x, y, batch_size=2)


def test_units_silent_on_a_few_examples_are_not_dead_units_silent_on_all_are():
    """At batch size 2 the 4-batch window holds 8 outputs per unit: a healthy MLP reads up to ~30% of
    its units 'never fired' there (rare features), which is no evidence of death; a layer pushed off
    by a negative bias is silent almost everywhere and is called on the same evidence."""
    task, loader = _tiny_batch_mlp()
    monitor = _fit(task, loader, steps=1500, every=10)
    assert sum(task.losses[-100:]) / 100 < 0.5
    assert max(v for _, v in monitor.curves("dead_fraction")["net.3"]) > 0.2  # past the warning line
    assert "dead" not in _kinds(monitor)
    sick = _fit(*_tiny_batch_mlp(bias=-3.0), steps=40)
    assert any(f.kind == "dead" and f.severity == "critical" for f in sick.diagnose())
