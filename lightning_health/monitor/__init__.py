"""What :class:`~lightning_health.HealthMonitor` does at each Lightning hook, kept out of the glue.

``callback.py`` maps Lightning's hooks onto these parts; each part owns one kind of state:

- :mod:`.runtime`: the objects of one fit (hooks, accumulator, sinks, parameter readers), built in
  ``setup`` and dropped at its end or on a crash; never pickled, never checkpointed.
- :mod:`.param_norms`: the parameter-gradient norms of one optimizer step, one optimizer at a time.
- :mod:`.record`: what outlives a fit and goes into checkpoints (curves, findings, windows), and the
  host side of a sampled step: readings -> logged values -> the diagnosis.
- :mod:`.publish`: the dashboard pieces written every few samples (findings, heatmap, depth profile).
- :mod:`.step_end`: the host side of a sampled step, in order (collect -> tabulate -> learn -> diagnose
  -> write -> react).
- :mod:`.resume`: the checkpoint key, the same in every process, and adopting state saved under an old key.

This folder sits at the end of the data flow: it may import every other part of the package.
"""
