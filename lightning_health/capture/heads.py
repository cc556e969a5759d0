"""Which monitored layers are the model's output: their output reaches the loss through no learned weight.

A sigmoid at the end of an autoencoder or a tanh at the end of a GAN generator is *meant* to sit at
0 or at -1 for most outputs (background pixels): that is the prediction, not a saturated layer. Its
gradient is the loss's own derivative (for BCE after a sigmoid it grows like ``1 / (p (1 - p))``),
so it is no reference for how much gradient the hidden layers should get either.

Found once per fit from the autograd graphs of the first sampled step's losses: walk back from
each loss and stop at every node that applies a weight being trained (a node with a parameter that
requires a gradient among its inputs). The monitored outputs reached before any such node are the
heads; a network frozen for this backward (a GAN's discriminator in the generator's step, with
Lightning's ``toggle_optimizer``; a frozen perceptual-loss network) is part of the loss, so the
generator's output behind it is a head too. Names never decide it, and each walk is bounded.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.Sigmoid())
    >>> seen = {}
    >>> for i in (1, 3):
    ...     _ = net[i].register_forward_hook(lambda m, a, out, i=i: seen.update({i: [out.grad_fn]}))
    >>> loss = nn.functional.binary_cross_entropy(net(torch.randn(5, 4)), torch.rand(5, 2))
    >>> output_heads(loss, seen)
    {3}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor


def _applies_a_weight(node: Any) -> bool:
    """Whether an autograd node takes a trainable leaf (a parameter) as an input."""
    for child, _index in getattr(node, "next_functions", ()):
        variable = getattr(child, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None and variable.requires_grad:
            return True
    return False


def output_heads(loss: Tensor, nodes: Mapping[int, Sequence[Any]], limit: int = 20_000) -> set[int]:
    """The keys of ``nodes`` (autograd nodes of monitored outputs) reached from ``loss`` through no weight.

    Args:
        loss: the tensor backward starts from.
        nodes: ``{layer index: the grad_fn of each of its outputs}`` recorded since the last backward
            (held, so their ids stay theirs during the walk).
        limit: the most graph nodes visited.
    """
    root = getattr(loss, "grad_fn", None)
    wanted = {id(node): index for index, calls in nodes.items() for node in calls if node is not None}
    if root is None or not wanted:
        return set()
    found: set[int] = set()
    stack: list[Any] = [root]
    seen: set[int] = set()
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) in wanted:
            found.add(wanted[id(node)])
        if _applies_a_weight(node):
            continue
        stack.extend(child for child, _index in node.next_functions if child is not None)
    return found
