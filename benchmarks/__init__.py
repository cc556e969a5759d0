"""Benchmarks of ``lightning_health`` against the monitors users reach for today (issue 5).

Run from the repository root::

    python -m benchmarks.run            # full run, writes docs/performance.md
    python -m benchmarks.run --quick    # tiny workloads, a few steps: checks the harness only
    python -m benchmarks.micro          # reductions alone against one read of the same tensors
"""
