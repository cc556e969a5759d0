"""Layer specs and a resume script shared by tests/test_faults.py and the new process it starts."""

from __future__ import annotations

from torch import nn

SET_LAYERS = {"net.1", "net.3", "net.5", "net.7"}


def relu_predicate(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.ReLU)


# Run as `python -c RESUME_SCRIPT CKPT`: resume both monitors from CKPT to the end of epoch 2 and print
# each one's act_std curve of net.3 as JSON (the last line of stdout).
RESUME_SCRIPT = """
import json, sys, warnings
import lightning.pytorch as pl
from torch.utils.data import DataLoader
from lightning_health import HealthMonitor
from lightning_health.offline.patients import PatientMLP, patient_loaders
from tests.conftest import trainer_kwargs
from tests.fault_helpers import SET_LAYERS, relu_predicate

monitors = [
    HealthMonitor(every_n_steps=1, layers=relu_predicate, verbose=False),
    HealthMonitor(every_n_steps=1, layers=SET_LAYERS, verbose=False),
]
loader = DataLoader(patient_loaders()[0].dataset, batch_size=16)
pl.Trainer(callbacks=monitors, **trainer_kwargs(max_epochs=2)).fit(PatientMLP(), loader, ckpt_path=sys.argv[1])
out = []
for m in monitors:
    points = m.curves("act_std")["net.3"]
    out.append({"steps": [s for s, _ in points], "values": [v for _, v in points]})
print(json.dumps(out))
"""
