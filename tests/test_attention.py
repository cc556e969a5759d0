"""Transformer readings: attention entropy / logit max against eager references, massive activations, findings."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_health import HealthMonitor
from lightning_health.capture.transformer import TransformerCapture
from lightning_health.readings.attention import attention_totals, massive_totals
from tests.conftest import trainer_kwargs

transformers = pytest.importorskip("transformers")


def _gpt2(impl: str | None = None) -> nn.Module:
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    if impl is not None:
        cfg._attn_implementation = impl
    return transformers.GPT2LMHeadModel(cfg).eval()


def _read(model: nn.Module, *args: object, **kwargs: object):
    cap = TransformerCapture(model)
    cap.attach()
    cap.armed = True
    with torch.no_grad():
        model(*args, **kwargs)
    cap.detach()
    return cap.unpack(torch.cat(cap.pack(torch.device("cpu"))).tolist())


def test_gpt2_readings_match_eager_attention_per_layer() -> None:
    torch.manual_seed(0)
    model = _gpt2()  # default (SDPA) kernel
    assert model.config._attn_implementation != "eager"
    for p in model.parameters():  # larger weights than the 0.02 init, so the heads differ from uniform
        p.data.mul_(3.0)
    ids = torch.randint(0, 50, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, 11:] = 0
    got = _read(model, ids, attention_mask=mask)

    eager = _gpt2("eager")
    eager.load_state_dict(model.state_dict())
    qkv: list[torch.Tensor] = []
    hooks = [blk.attn.c_attn.register_forward_hook(lambda m, i, o: qkv.append(o)) for blk in eager.transformer.h]
    with torch.no_grad():
        out = eager(ids, attention_mask=mask, output_attentions=True)
    for h in hooks:
        h.remove()
    allowed = torch.tril(torch.ones(16, 16, dtype=torch.bool)) & mask.bool()[:, None, None, :]
    for layer, (probs, fused) in enumerate(zip(out.attentions, qkv)):
        name = f"transformer.h.{layer}.attn"
        ent = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)  # (B, H, L)
        per_head = ent.mean(dim=(0, 2))
        q, k, _ = fused.split(64, dim=2)
        q, k = (t.view(3, 16, 4, 16).transpose(1, 2) for t in (q, k))
        scores = (q @ k.transpose(-1, -2)) / 4.0
        top = scores.masked_fill(~allowed, -math.inf).amax()
        assert got.metrics[name]["attn_entropy"] == pytest.approx(ent.mean().item(), rel=1e-4)
        assert got.metrics[name]["attn_entropy_min"] == pytest.approx(per_head.min().item(), rel=1e-4)
        assert got.metrics[name]["attn_logit_max"] == pytest.approx(top.item(), rel=1e-4)
        assert got.head_entropy[name] == pytest.approx(per_head.tolist(), rel=1e-4)
    assert set(got.metrics) >= {"transformer.h.0", "transformer.h.1"}  # residual blocks read too


def test_gpt2_under_bf16_autocast_is_read_from_its_own_bf16_queries_and_keys() -> None:
    """The hooks run inside the model's autocast region (``precision="bf16-mixed"``), which would turn
    the rebuilt scores' matmul into bfloat16; they are scored in float32 from the queries and keys
    the model itself computed in bfloat16. Reference: a float64 softmax of those same q and k."""
    torch.manual_seed(0)
    model = _gpt2()
    for p in model.parameters():
        p.data.mul_(3.0)
    ids = torch.randint(0, 50, (2, 16))
    qkv: list[torch.Tensor] = []
    hooks = [blk.attn.c_attn.register_forward_hook(lambda m, i, o: qkv.append(o)) for blk in model.transformer.h]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _read(model, ids)
    for h in hooks:
        h.remove()
    assert len(qkv) == 4  # per layer: the monitor's recomputation (its pre-hook), then the model's own call
    assert all(torch.equal(mine, own) for mine, own in zip(qkv[::2], qkv[1::2]))
    causal = torch.tril(torch.ones(16, 16, dtype=torch.bool))
    for layer, fused in enumerate(qkv[1::2]):
        assert fused.dtype == torch.bfloat16  # what the model's own attention saw
        q, k, _ = fused.double().split(64, dim=2)
        q, k = (t.view(2, 16, 4, 16).transpose(1, 2) for t in (q, k))
        scores = ((q @ k.transpose(-1, -2)) / 4.0).masked_fill(~causal, -math.inf)
        probs = scores.softmax(-1)
        ent = -(probs * torch.log(probs.clamp_min(1e-300))).sum(-1)
        name = f"transformer.h.{layer}.attn"
        assert got.metrics[name]["attn_entropy"] == pytest.approx(ent.mean().item(), rel=1e-5)
        assert got.metrics[name]["attn_logit_max"] == pytest.approx(scores.amax().item(), rel=1e-5)


def test_modules_no_hook_may_go_on_are_left_out_and_named_not_called_unrecognised() -> None:
    """Inside a torch.compile(fullgraph=True) region (capture/fullgraph.py) the attention is not hooked."""
    model = _gpt2()
    skip = {id(m) for m in model.transformer.h[0].modules()}
    cap = TransformerCapture(model, skip=skip)
    assert cap.left_out == ["transformer.h.0.attn"] and cap.unrecognised == []
    assert [s.name for s in cap.attention] == ["transformer.h.1.attn"] and cap.blocks == ["transformer.h.1"]


def test_a_nan_head_makes_the_module_reading_nan_not_the_other_heads_mean() -> None:
    """A head whose queries hold NaN reads NaN, and so do the module's mean and lowest entropy: the
    mean of the finite heads alone would show a broken module as healthy."""
    torch.manual_seed(0)
    model = nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        model.in_proj_weight[0, 0] = math.nan  # head 0's first query feature
    x = torch.randn(2, 5, 16)
    wrapper = nn.Sequential()
    wrapper.add_module("attn", model)
    cap = TransformerCapture(wrapper)
    cap.attach()
    cap.armed = True
    with torch.no_grad():
        model(x, x, x, need_weights=False)
    cap.detach()
    got = cap.unpack(torch.cat(cap.pack(torch.device("cpu"))).tolist())
    heads = got.head_entropy["attn"]
    assert math.isnan(heads[0]) and all(math.isfinite(h) for h in heads[1:])
    assert math.isnan(got.metrics["attn"]["attn_entropy"]) and math.isnan(got.metrics["attn"]["attn_entropy_min"])


def test_a_bf16_mixed_fit_reads_attention_at_every_sampled_step_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*cannot read attention.*")
        monitor = _fit(_TinyGPT(), 4, precision="bf16-mixed")
    for layer in ("model.transformer.h.0.attn", "model.transformer.h.1.attn"):
        entropy = [value for _step, value in monitor.curves("attn_entropy")[layer]]
        assert len(entropy) == 4 and all(0.0 < value <= math.log(16) for value in entropy)


def test_multihead_attention_respects_key_padding_mask() -> None:
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 10, 32) * 3
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[0, 6:] = True
    cap = TransformerCapture(mha)
    cap.attach()
    cap.armed = True
    with torch.no_grad():
        _, probs = mha(x, x, x, key_padding_mask=pad, need_weights=True, average_attn_weights=False)
    got = cap.unpack(torch.cat(cap.pack(torch.device("cpu"))).tolist()).metrics[""]
    ent = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
    assert got["attn_entropy"] == pytest.approx(ent.mean().item(), rel=1e-4)
    assert got["attn_entropy_min"] == pytest.approx(ent.mean(dim=(0, 2)).min().item(), rel=1e-4)
    w_q, w_k, _ = mha.in_proj_weight.chunk(3)
    b_q, b_k, _ = mha.in_proj_bias.chunk(3)
    q = (x @ w_q.T + b_q).view(2, 10, 4, 8).transpose(1, 2)
    k = (x @ w_k.T + b_k).view(2, 10, 4, 8).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    top = scores.masked_fill(pad[:, None, None, :], -math.inf).amax()
    assert got["attn_logit_max"] == pytest.approx(top.item(), rel=1e-4)


def test_attention_totals_against_a_float64_softmax_with_padding_causal_mask_and_a_nan_head() -> None:
    """Entropy per head from an independent float64 softmax; a query row with no allowed key is left
    out; a NaN in one head's queries reads NaN there (not a healthy 0), the other head unchanged."""
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 2, 6, 4, generator=g) * 3, torch.randn(2, 2, 6, 4, generator=g) * 3
    allowed = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    allowed[1, :, :, 4:] = False  # padding: the second example's last two keys
    allowed[1, :, 0, :] = False  # and its first query sees no key at all
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.5
    keep = allowed & causal
    p = torch.softmax(s.masked_fill(~keep, -math.inf), dim=-1)
    ref = -(p * torch.log(p.clamp_min(1e-300))).sum(-1).nan_to_num(0.0)  # (B, H, L); the keyless row: 0
    ent, rows, top = attention_totals(q, k, 0.5, mask=allowed, causal=True, chunk_elements=2 * 2 * 6 * 2)
    torch.testing.assert_close(ent, ref.sum(dim=(0, 2)), rtol=1e-5, atol=1e-6)
    assert rows.tolist() == [11.0, 11.0]
    torch.testing.assert_close(top, s.masked_fill(~keep, -math.inf).amax(dim=(0, 2, 3)).float())
    q[0, 1, 3, 0] = math.nan
    ent, rows, _ = attention_totals(q, k, 0.5, mask=allowed, causal=True)
    assert math.isnan(ent[1]) and ent[0].item() == pytest.approx(ref[:, 0].sum().item(), rel=1e-5)


def test_attention_totals_chunking_and_massive_totals() -> None:
    torch.manual_seed(2)
    q, k = torch.randn(2, 3, 40, 8), torch.randn(2, 3, 40, 8)
    whole = attention_totals(q, k, 0.7, causal=True)
    chunked = attention_totals(q, k, 0.7, causal=True, chunk_elements=2 * 3 * 40 * 3)  # 3 queries a chunk
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b)
    x = torch.randn(4, 50, 16)
    x[..., 5] *= 1000
    ratio, share = massive_totals(x).tolist()
    a = x.abs()
    assert ratio == pytest.approx((a.max() / a.median()).item(), rel=1e-6)
    assert share == pytest.approx(((a.amax(dim=(0, 1)) > 100 * a.median()).float().mean()).item())


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_bert_and_llama_are_recognised(family: str) -> None:
    torch.manual_seed(3)
    if family == "bert":
        cfg = transformers.BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
        )
        model = transformers.BertModel(cfg).eval()
        prefix, block = "encoder.layer.0.attention.self", "encoder.layer.0"
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
        )
        model = transformers.LlamaForCausalLM(cfg).eval()
        prefix, block = "model.layers.0.self_attn", "model.layers.0"
    ids = torch.randint(0, 50, (2, 12))
    got = _read(model, ids, attention_mask=torch.ones(2, 12, dtype=torch.long))
    reading = got.metrics[prefix]
    assert all(math.isfinite(v) for v in reading.values())
    assert 0 < reading["attn_entropy_min"] <= reading["attn_entropy"] <= math.log(12) + 1e-5
    assert math.isfinite(got.metrics[block]["massive_ratio"])


class _TinyGPT(pl.LightningModule):
    def __init__(self, sabotage: float = 1.0, massive: bool = False) -> None:
        super().__init__()
        self.model = _gpt2().train()
        self.sabotage, self.massive = sabotage, massive

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.sabotage != 1.0 and self.global_step == 3:  # scaled-up query weights from step 3 on
            with torch.no_grad():
                for blk in self.model.transformer.h:
                    blk.attn.c_attn.weight[:, :64].mul_(self.sabotage)
                    blk.ln_1.weight.mul_(4.0)
        if self.massive and self.global_step == 3:  # one outlier channel in the residual stream from step 3 on
            with torch.no_grad():
                self.model.transformer.wte.weight[:, 7] += 50.0
        return self.model(batch, labels=batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _fit(module: pl.LightningModule, steps: int, **trainer: object) -> HealthMonitor:
    torch.manual_seed(4)
    data = torch.utils.data.DataLoader(torch.randint(0, 50, (steps * 4, 16)), batch_size=4)
    monitor = HealthMonitor(every_n_steps=1, verbose=False, heatmap_every_n_samples=None)
    pl.Trainer(max_steps=steps, callbacks=[monitor], **trainer_kwargs(**trainer)).fit(module, data)
    return monitor


def test_healthy_random_gpt2_raises_no_transformer_finding() -> None:
    monitor = _fit(_TinyGPT(), 6)
    assert len(monitor.curves("attn_entropy")["model.transformer.h.0.attn"]) == 6
    kinds = {f.kind for f in monitor.diagnose()}
    assert not kinds & {"entropy_collapse", "logit_growth", "massive_activation"}


def test_scaled_queries_raise_logit_growth_and_entropy_collapse_with_onset() -> None:
    monitor = _fit(_TinyGPT(sabotage=300.0), 5)
    found = {(f.layer, f.kind): f for f in monitor.diagnose()}
    for kind in ("logit_growth", "entropy_collapse"):
        assert found[("model.transformer.h.0.attn", kind)].step == 3, monitor.diagnose()


def test_outlier_channel_raises_massive_activation_with_onset() -> None:
    monitor = _fit(_TinyGPT(massive=True), 5)
    found = {(f.layer, f.kind): f for f in monitor.diagnose()}
    assert found[("model.transformer.h.0", "massive_activation")].step == 3, monitor.diagnose()
    assert monitor.curves("massive_channels")["model.transformer.h.0"][-1][1] > 0


def test_entropy_of_one_hot_attention_with_huge_logits_is_zero_not_negative() -> None:
    """Logits in the thousands (a diverging run) leave float32 rounding in ``lse - E[s]``: never below 0."""
    torch.manual_seed(0)
    q, k = 30.0 * torch.randn(2, 4, 24, 16), 30.0 * torch.randn(2, 4, 24, 16)
    entropy, rows, top = attention_totals(q, k, 0.25, causal=True)
    assert top.min() > 1e3
    assert (entropy >= 0).all() and (entropy / rows).max() < 0.05


def test_massive_outliers_built_up_over_a_long_run_are_not_a_finding_a_jump_is() -> None:
    """Sun et al. find massive activations in every trained LLM: a ratio that climbs from 7 at init to
    700 over 100 sampled steps is how they form; 4x within the last few readings is a finding."""
    from lightning_health.diagnosis.rules import evaluate
    from lightning_health.diagnosis.thresholds import Thresholds
    from lightning_health.pipeline.history import History
    from lightning_health.pipeline.transformer_step import earlier_levels

    def verdict(curve: list[float]) -> set[str]:
        history = History()
        for step, value in enumerate(curve[:-1]):
            history.add(step, "massive_ratio", "block", value)
        now = {"massive_ratio": curve[-1], "massive_channels": 0.01}
        readings = {"block": {**now, **earlier_levels(history, "block", now)}}
        return {f.kind for f in evaluate(len(curve), readings, Thresholds())[0]}

    slow = [7.0 * 1.048**i for i in range(101)]  # 7 -> ~750, 4.8% a reading
    assert slow[-1] > 100 * slow[0] and not verdict(slow)
    assert verdict([7.0] * 20 + [30.0, 300.0]) == {"massive_activation"}


def test_an_attention_module_the_monitor_cannot_read_is_named_at_setup() -> None:
    """An attention module no adapter knows is named once at set-up, not silently read as nothing."""

    class ToyAttention(nn.Module):  # its own projection names: nothing to recognise it by
        def __init__(self) -> None:
            super().__init__()
            self.wqkv = nn.Linear(16, 48)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.wqkv(x).chunk(3, dim=-1)
            return torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1) @ v

    class Toy(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.attn = nn.Embedding(50, 16), ToyAttention()
            self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 50))

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            logits = self.mlp(self.attn(self.embed(batch)))
            return nn.functional.cross_entropy(logits.reshape(-1, 50), batch.reshape(-1))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    assert TransformerCapture(Toy()).unrecognised == ["ToyAttention"]
    assert TransformerCapture(_gpt2()).unrecognised == []  # read: nothing to say
    wrapped = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1,
                                                             num_attention_heads=4, intermediate_size=64))  # fmt: skip
    assert TransformerCapture(wrapped).unrecognised == []  # BertAttention is read through its BertSelfAttention
    monitor = HealthMonitor(every_n_steps=1, verbose=False, heatmap_every_n_samples=None)
    data = torch.utils.data.DataLoader(torch.randint(0, 50, (8, 12)), batch_size=4)
    with pytest.warns(UserWarning, match="no attention entropy or logits from ToyAttention"):
        pl.Trainer(max_steps=2, callbacks=[monitor], **trainer_kwargs()).fit(Toy(), data)
    assert monitor.curves("act_std")  # every other reading is unaffected


@pytest.mark.parametrize("family", ["gpt_neox", "distilbert"])
def test_fused_qkv_and_q_lin_attention_match_eager(family: str) -> None:
    """GPT-NeoX (Pythia): per-head [q | k | v] in one projection, partial rotary; DistilBERT: q_lin/k_lin, padded."""
    torch.manual_seed(0)
    if family == "gpt_neox":
        config = transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, vocab_size=64, rotary_pct=0.25)  # fmt: skip
        model_cls, kwargs = transformers.GPTNeoXForCausalLM, {}
    else:
        config = transformers.DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4,
                                               max_position_embeddings=32, vocab_size=64)  # fmt: skip
        mask = torch.ones(2, 16, dtype=torch.long)
        mask[1, 10:] = 0
        model_cls, kwargs = transformers.DistilBertForMaskedLM, {"attention_mask": mask}
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    for p in model.parameters():
        p.data.mul_(3.0)
    ids = torch.randint(0, 64, (2, 16))
    got = _read(model, ids, **kwargs)
    with torch.no_grad():
        probs = model(ids, output_attentions=True, **kwargs).attentions
    ours = [m["attn_entropy"] for m in got.metrics.values() if "attn_entropy" in m]
    reference = [(-(a * a.clamp_min(1e-30).log()).sum(-1)).mean().item() for a in probs]
    assert len(ours) == 2 and ours == pytest.approx(reference, rel=1e-4)


_FALCON = {
    "multi_query": {},
    "interleaved": dict(multi_query=False),
    "grouped": dict(new_decoder_architecture=True, num_kv_heads=2),
    "alibi": dict(alibi=True, multi_query=False),
}


@pytest.mark.parametrize("layout", sorted(_FALCON))
def test_falcon_attention_matches_eager_in_each_qkv_layout(layout: str) -> None:
    """Falcon's fused projection in its three layouts, rotary or ALiBi (carried in the mask), padded."""
    torch.manual_seed(0)
    config = transformers.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
                                       **_FALCON[layout])  # fmt: skip
    config._attn_implementation = "eager"
    model = transformers.FalconForCausalLM(config).eval()
    assert TransformerCapture(model).unrecognised == []
    for p in model.parameters():
        p.data.mul_(3.0)
    ids, mask = torch.randint(0, 64, (2, 16)), torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    got = _read(model, ids, attention_mask=mask)
    with torch.no_grad():
        probs = model(ids, attention_mask=mask, output_attentions=True).attentions
    ours = [m["attn_entropy"] for m in got.metrics.values() if "attn_entropy" in m]
    reference = [(-(a * a.clamp_min(1e-30).log()).sum(-1)).mean().item() for a in probs]
    assert len(ours) == 2 and ours == pytest.approx(reference, rel=1e-4)


def test_t5_self_attention_matches_eager_with_relative_bias_padding_and_causal_decoder() -> None:
    """T5: unscaled scores plus the relative-position bias (computed by the first layer, handed to the
    others), the encoder's padding mask and the decoder's causal mask; cross-attention is not read."""
    torch.manual_seed(0)
    config = transformers.T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4,
                                   vocab_size=64, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                   decoder_start_token_id=0)  # fmt: skip
    config._attn_implementation = "eager"
    model = transformers.T5ForConditionalGeneration(config).eval()
    assert TransformerCapture(model).unrecognised == []
    ids, labels = torch.randint(1, 64, (2, 16)), torch.randint(1, 64, (2, 12))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    got = _read(model, ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels, output_attentions=True)
    read = {name: m["attn_entropy"] for name, m in got.metrics.items() if "attn_entropy" in m}
    names = [f"{side}.block.{i}.layer.0.SelfAttention" for side in ("encoder", "decoder") for i in (0, 1)]
    assert sorted(read) == sorted(names)  # no cross-attention (EncDecAttention)
    probs = out.encoder_attentions + out.decoder_attentions
    reference = [(-(a * a.clamp_min(1e-30).log()).sum(-1)).mean().item() for a in probs]
    ours = [read[name] for name in names]
    assert ours == pytest.approx(reference, rel=1e-4)


_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
_SMALL.update(max_position_embeddings=32, vocab_size=64)
# QK-norm per head (Qwen3, Gemma3) or across heads (OLMo2), partial rotary (Phi), soft-capped scores (Gemma 2)
_NORMED = {
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=16, num_key_value_heads=2)),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", dict(num_key_value_heads=2)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(head_dim=16, num_key_value_heads=2)),
    "phi": ("PhiForCausalLM", "PhiConfig", {}),
    "phi_qk_layernorm": ("PhiForCausalLM", "PhiConfig", dict(qk_layernorm=True)),
    "gemma2_softcap": ("Gemma2ForCausalLM", "Gemma2Config", dict(head_dim=16, attn_logit_softcapping=1.0)),
}


@pytest.mark.parametrize("family", sorted(_NORMED))
def test_llama_style_variants_match_eager_attention(family: str) -> None:
    """The scores as the module computes them: its QK-norm, partial rotary and logit soft-capping included
    (without them Qwen3's entropy read 1.14 nats where the model attends with 0.29)."""
    model_cls, config_cls, extra = _NORMED[family]
    if not hasattr(transformers, model_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {model_cls}")
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**_SMALL, **extra)
    config._attn_implementation = "eager"
    model = getattr(transformers, model_cls)(config).eval()
    for p in model.parameters():  # larger weights than the init, so the heads differ from uniform
        p.data.mul_(3.0)
    if "softcap" in family:  # scores well past the cap of 1, where tanh bends them
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.data.mul_(20.0)
    ids = torch.randint(0, 64, (2, 16))
    got = _read(model, ids)
    with torch.no_grad():
        probs = model(ids, output_attentions=True).attentions
    ours = [m["attn_entropy"] for m in got.metrics.values() if "attn_entropy" in m]
    reference = [(-(a * a.clamp_min(1e-30).log()).sum(-1)).mean().item() for a in probs]
    assert len(ours) == len(reference) == 2
    assert ours == pytest.approx(reference, rel=1e-4)
