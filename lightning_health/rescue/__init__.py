"""Treatments for dead and dormant units, and how the monitor applies them to a running model.

``locate`` finds a unit's weights, ``recycle`` re-initialises units (ReDo), ``swap`` replaces an
activation module; ``policy`` applies them from masks and ``runner`` is the monitor's side (cadence,
masks from the windows, event log, resume). May import ``capture`` and ``pipeline``, never ``sinks``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> opt = torch.optim.Adam(net.parameters())
    >>> w = find_units_weights(net, "1")
    >>> (w.layer_in_name, w.layer_out_name)
    ('0', '2')
    >>> dead = torch.zeros(8, dtype=torch.bool)
    >>> dead[:3] = True
    >>> reinit_dead_units(w.layer_in, w.layer_out, dead, optimizer=opt, norms=w.norms)
    3
    >>> replace_activation(net, nn.ReLU, lambda: nn.LeakyReLU(0.01))
    ['1']
"""

from lightning_health.rescue.locate import InitName, UnitWeights, find_units_weights
from lightning_health.rescue.recycle import reinit_dead_units
from lightning_health.rescue.swap import replace_activation

__all__ = ["InitName", "UnitWeights", "find_units_weights", "reinit_dead_units", "replace_activation"]
