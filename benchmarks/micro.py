"""Micro-benchmark: HealthMonitor's per-layer reductions against one read of the same tensors.

For each workload, one forward and backward pass captures every monitored layer's activation and
activation gradient (the layers HealthMonitor selects by default). Then, on those captured
tensors only, with 2 threads:

* **one read**: a single ``sum`` over every activation and every gradient, stacked and moved to the
  host once. No reduction can read its input in less time: this is the physical limit.
* **reductions**: exactly the per-layer work HealthMonitor's hooks do on a sampled step by
  default (see ``lightning_health/capture/hooks.py``): per activation ``unit_fire_mask``, the
  per-unit ``|a|`` sums and moments, ``activation_totals`` (reusing the moments) and
  the histogram samples (binned together per kind, as the step end does), per gradient
  ``gradient_totals`` + histogram sample, then
  everything stacked and moved to the host once.

The ratio of the two is the distance to the physical limit (issue 5's target: within 4x). A
breakdown per reduction shows where that time goes.

Run: ``python -m benchmarks.micro [--workloads mlp,cnn,lm] [--repeats 20] [--compiled]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from benchmarks.harness import NUM_THREADS
from benchmarks.workloads import WORKLOADS, make_workload


@dataclass
class Captured:
    """The monitored layers' tensors of one training step."""

    names: list[str]
    activations: list[Tensor]
    gradients: list[Tensor]
    neuron_dims: list[int]
    bounds: list[tuple[float, float] | None]
    never_negative: list[bool]  # the activation's probed range starts at 0 or above (ReLU, sigmoid)
    unit_sums: list[Tensor | None]  # their per-unit sums (the hooks' moments, taken by the totals part)

    @property
    def megabytes(self) -> float:
        """Total size of all captured tensors in MB."""
        return sum(t.numel() * t.element_size() for t in self.activations + self.gradients) / 1e6


def capture(workload: str, *, tiny: bool = False, seed: int = 0) -> Captured:
    """Run one forward/backward of ``workload`` and keep the default-selected layers' tensors."""
    from lightning_health.capture.selection import select_layers
    from lightning_health.readings.collapse import unit_moments

    module, loader = make_workload(workload, num_batches=1, tiny=tiny, seed=seed)
    layers = select_layers(module)
    acts: dict[int, Tensor] = {}
    grads: dict[int, Tensor] = {}
    handles = []

    def make_hook(index: int) -> Callable[..., None]:
        def hook(_: torch.nn.Module, __: object, output: Tensor) -> None:
            acts[index] = output.detach()
            output.register_hook(lambda g: grads.__setitem__(index, g.detach()))

        return hook

    for index, layer in enumerate(layers):
        handles.append(layer.module.register_forward_hook(make_hook(index)))
    try:
        loss = module.training_step(next(iter(loader)), 0)
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    order = [i for i in range(len(layers)) if i in acts and i in grads]
    dims = [layers[i].neuron_dim if acts[i].dim() >= 3 else -1 for i in order]
    never_negative = [layers[i].profile.range[0] >= 0 for i in order]
    return Captured(
        names=[layers[i].name for i in order],
        activations=[acts[i] for i in order],
        gradients=[grads[i] for i in order],
        neuron_dims=dims,
        bounds=[layers[i].profile.bounds for i in order],
        never_negative=never_negative,
        unit_sums=[
            unit_moments(acts[i], dim)[: acts[i].shape[dim]] if nn else None
            for i, dim, nn in zip(order, dims, never_negative)
        ],
    )


def one_read(c: Captured) -> list[float]:
    """The physical limit: every element of every captured tensor read once, one host transfer."""
    return torch.stack([t.sum() for t in c.activations + c.gradients]).tolist()


def _parts(c: Captured, bins: int = 64, samples: int = 8192) -> dict[str, Callable[[], list[Tensor]]]:
    """The hooks' per-layer work, part by part, as ``lightning_health/capture/hooks.py`` does it by default:
    the reused scratch buffer, histogram boundaries made once, per-unit ``|a|`` sums (dormancy) and
    moments (collapse), whose totals the activation totals reuse."""
    from lightning_health.capture.histograms import ACT, GRAD, StepHistograms
    from lightning_health.readings import reductions as R
    from lightning_health.readings.collapse import unit_moments
    from lightning_health.readings.dormancy import unit_abs_sums

    scratch = R.Scratch()
    step_histograms = StepHistograms(
        {"layer": R.symlog_edges(bins, 1e-4, 1e4)}, R.symlog_edges(bins, 1e-9, 1e3), samples
    )
    pairs = list(zip(c.activations, c.neuron_dims, c.bounds, strict=True))

    def activation_totals() -> list[Tensor]:
        out = []
        for (y, d, b), nn in zip(pairs, c.never_negative):
            moments = unit_moments(y, d, scratch=scratch.get(y))
            sums = moments.view(2, -1).sum(dim=1)
            # |a| sums: a never-negative activation's are its moments' sums, as in the hooks
            out += [moments] if nn else [unit_abs_sums(y, d, scratch=scratch.get(y)), moments]
            out.append(R.activation_totals(y, b, 0.01, scratch.get(y), moments=sums))
        return out

    def fire_masks() -> list[Tensor]:  # a never-negative activation's from the per-unit sums the totals part takes
        return [
            (R.fired_from_sums(s) if s is not None else R.unit_fire_mask(y, d)).to(torch.float64)
            for (y, d, _b), s in zip(pairs, c.unit_sums)
        ]

    def histograms(kind: str, tensors: list[Tensor]) -> list[Tensor]:
        """Each hook copies its sample; the step end bins them all at once (capture/histograms.py)."""
        for index, t in enumerate(tensors):
            step_histograms.take(kind, index, "layer" if kind == ACT else None, t)
        return list(step_histograms.counts().values())

    return {
        "fire mask": fire_masks,
        "activation totals + per-unit sums": activation_totals,
        "activation histogram": lambda: histograms(ACT, c.activations),
        "gradient totals": lambda: [R.gradient_totals(g, scratch.get(g)) for g in c.gradients],
        "gradient histogram": lambda: histograms(GRAD, c.gradients),
    }


def reductions(c: Captured, parts: dict[str, Callable[[], list[Tensor]]] | None = None) -> list[float]:
    """Everything HealthMonitor computes from these tensors on a sampled step, one host transfer.

    ``parts``: :func:`_parts` made once, as the monitor makes its buffers and histogram tables once
    at setup (building them inside the timed call would time the set-up).
    """
    out: list[Tensor] = []
    for part in (parts if parts is not None else _parts(c)).values():
        out += part()
    return torch.cat(out).tolist()


def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-call dispatch and allocation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass(frozen=True)
class MicroRow:
    """Micro-benchmark result of one workload (seconds)."""

    workload: str
    layers: int
    megabytes: float
    read_s: float
    reductions_s: float
    parts_s: dict[str, float]

    @property
    def ratio(self) -> float:
        """Reductions time over one-read time: the distance to the physical limit."""
        return self.reductions_s / self.read_s


def run_micro(workloads: Sequence[str], *, tiny: bool = False, repeats: int = 20) -> list[MicroRow]:
    """Time one read and the reductions (in total and per part) for each workload."""
    torch.set_num_threads(NUM_THREADS)
    rows = []
    for workload in workloads:
        c = capture(workload, tiny=tiny)
        made = _parts(c)
        parts = {name: _time(lambda fn=fn: torch.cat(fn()).tolist(), repeats) for name, fn in made.items()}
        rows.append(
            MicroRow(
                workload=workload,
                layers=len(c.names),
                megabytes=c.megabytes,
                read_s=_time(lambda c=c: one_read(c), repeats),
                reductions_s=_time(lambda c=c, made=made: reductions(c, made), repeats),
                parts_s=parts,
            )
        )
    return rows


def micro_markdown(workloads: Sequence[str], *, tiny: bool = False, repeats: int = 20) -> str:
    """The micro-benchmark as a markdown section (or a note when the core is not importable)."""
    try:
        rows = run_micro(workloads, tiny=tiny, repeats=repeats)
    except ImportError as error:
        return f"## Reductions against one read\n\nNot run: the core could not be imported ({error}).\n"
    part_names = list(rows[0].parts_s) if rows else []
    lines = [
        "## Reductions against one read (distance to the physical limit)",
        "",
        f"`python -m benchmarks.micro`: on the tensors of one training step (every default-selected layer's"
        f" activation and activation gradient), median of {repeats} runs, 2 threads. *one read* is a single"
        " `sum` over every tensor and one host transfer; *reductions* is all of HealthMonitor's per-layer work on"
        " a sampled step and one host transfer. Parts are timed separately (each with its own host transfer).",
        "",
        "| workload | layers | MB read | one read (ms) | reductions (ms) | ratio | "
        + " | ".join(f"{p} (ms)" for p in part_names)
        + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(part_names),
    ]
    for r in rows:
        parts = " | ".join(f"{r.parts_s[p] * 1e3:.2f}" for p in part_names)
        lines.append(
            f"| {r.workload} | {r.layers} | {r.megabytes:.1f} | {r.read_s * 1e3:.2f} | {r.reductions_s * 1e3:.2f} "
            f"| {r.ratio:.1f}x | {parts} |"
        )
    return "\n".join(lines) + "\n"


def compiled_markdown(workloads: Sequence[str], *, tiny: bool = False, repeats: int = 20) -> str:
    """Eager against compiled (``compile_reductions=True``) activation and gradient totals, per workload.

    Only the totals are compiled (fire masks and histograms stay eager), so only they are compared.
    The one-off compilation happens in the warm-up call and is not timed.
    """
    from lightning_health.readings import kernels
    from lightning_health.readings import reductions as R

    torch.set_num_threads(NUM_THREADS)
    lines = [
        "## Activation and gradient totals: eager against `compile_reductions=True`",
        "",
        f"`python -m benchmarks.micro --compiled`: median of {repeats} runs, 2 threads, one host transfer each.",
        "",
        "| workload | one read (ms) | eager totals (ms) | compiled totals (ms) | compiled / eager |",
        "|---|---:|---:|---:|---:|",
    ]
    for workload in workloads:
        c = capture(workload, tiny=tiny)
        scratch = R.Scratch()
        pairs = list(zip(c.activations, c.bounds, strict=True))
        thresholds = [kernels.saturation_thresholds(b, 0.01, y.device) for y, b in pairs]

        def eager(c: Captured = c, pairs: list = pairs, scratch: R.Scratch = scratch) -> list[float]:
            acts = [R.activation_totals(y, b, 0.01, scratch.get(y)) for y, b in pairs]
            return torch.cat(acts + [R.gradient_totals(g, scratch.get(g)) for g in c.gradients]).tolist()

        def compiled(c: Captured = c, thresholds: list[Tensor] = thresholds) -> list[float]:
            acts = [kernels.activation_totals(y, t) for y, t in zip(c.activations, thresholds, strict=True)]
            return torch.cat(acts + [kernels.gradient_totals(g) for g in c.gradients]).tolist()

        read_s, eager_s, compiled_s = (_time(fn, repeats) for fn in (lambda c=c: one_read(c), eager, compiled))
        times = " | ".join(f"{t * 1e3:.2f}" for t in (read_s, eager_s, compiled_s))
        lines.append(f"| {workload} | {times} | {compiled_s / eager_s:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Print the micro-benchmark table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.micro", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, from mlp,cnn,lm")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--compiled", action="store_true", help="compare eager and compiled totals instead")
    args = parser.parse_args(argv)
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        parser.error(f"Expected `--workloads` from {', '.join(WORKLOADS)}, got {args.workloads!r}")
    if args.compiled:
        print(compiled_markdown(names, tiny=args.tiny, repeats=args.repeats))
    else:
        print(micro_markdown(names, tiny=args.tiny, repeats=args.repeats))


if __name__ == "__main__":
    main()
