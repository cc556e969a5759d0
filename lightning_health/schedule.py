"""When to sample: a pure function of the optimizer step (``trainer.global_step``).

Steps ``0, N, 2N, ...`` are sampled, so readings from different runs, and from every DDP rank,
land on the same steps without any communication.
"""

from __future__ import annotations


def validate_every_n_steps(every_n_steps: object) -> int:
    """Return ``every_n_steps`` if it is a positive int, else raise naming the argument."""
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
        raise TypeError(
            f"Expected `every_n_steps` to be a positive int, got {every_n_steps!r} ({type(every_n_steps).__name__})"
        )
    if every_n_steps <= 0:
        raise ValueError(f"Expected `every_n_steps` to be a positive int, got {every_n_steps}")
    return every_n_steps


def is_sampled(step: int, every_n_steps: int) -> bool:
    """Whether optimizer step ``step`` is read.

    Example:
        >>> [s for s in range(7) if is_sampled(s, 3)]
        [0, 3, 6]
    """
    return step % every_n_steps == 0
