"""What to try, per finding kind: the one place a hint's wording lives."""

from __future__ import annotations

HINTS = {
    "dead": "Try LeakyReLU or GELU, He (Kaiming) initialisation, or a lower learning rate; "
    "dead units can be re-initialised (see lightning_health.rescue).",
    "inactive": "These units still learn: a smooth rectifier passes a small gradient on its negative side, and "
    "they often come back on their own. If the share keeps growing, lower the learning rate, check the "
    "initialisation scale and the bias of the layer before, or normalise before the activation.",
    "saturated": "Use Xavier initialisation for tanh/sigmoid, normalise the inputs, or add BatchNorm/LayerNorm "
    "before the activation.",
    "vanishing_gradient": "Add residual connections or normalization, match the initialisation to the activation "
    "(He for ReLU, Xavier for tanh), or switch to a ReLU-family activation.",
    "exploding_gradient": "Lower the learning rate, clip gradients (Trainer(gradient_clip_val=1.0)), add "
    "normalization, or scale down residual branches.",
    "collapsed": "Check the initialisation scale (He/Xavier) and add normalization; collapse usually follows dead "
    "or saturated layers upstream.",
    "entropy_collapse": "The whole layer attends nearly one-hot: add QK-layernorm, lower the learning rate or warm "
    "it up longer, or use sigmaReparam (Zhai et al., 2023); check the logit_growth reading of the same layer.",
    "logit_growth": "Attention logits are past what healthy runs reach, the step before divergence: add "
    "QK-layernorm (Dehghani et al., 2023), lower the learning rate, add a z-loss on the output logits "
    "(Wortsman et al., 2023), or cap the scores (tanh softcapping).",
    "massive_activation": "Outlier channels in the residual stream are growing: they exist in healthy LLMs too "
    "(Sun et al., 2024), so watch the trend; weight decay, a lower learning rate, or attention biases / "
    "softmax-off-by-one can keep them from growing.",
    "nonfinite": "Lower the learning rate, clip gradients, guard log/div against zero, and prefer bf16 to fp16 "
    "when values overflow.",
    "gradient_flow": "The gradient changes by this factor across the named stretch: look there for a missing "
    "residual or normalization, a saturating activation, or a mismatched initialisation.",
    "stalled": "Check that the module's parameters are in the optimizer with a non-zero learning rate (param "
    "groups, schedulers, freezing), and look upstream for dead or saturated layers that starve it of gradient.",
    "unstable": "The step is large for this module's weights: lower its learning rate (a smaller param-group lr or "
    "warm-up), clip gradients, or initialise it at a larger scale.",
}
