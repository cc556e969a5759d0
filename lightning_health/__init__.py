"""Per-layer activation and gradient health for PyTorch Lightning runs."""

__version__ = "0.1.0"
