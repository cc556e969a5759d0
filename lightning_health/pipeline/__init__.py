"""From per-layer device buffers to host numbers: packing, the one per-step sync, windows, history, schedule.

May import ``capture`` and ``readings``; never ``diagnosis`` or ``sinks`` (the callback hands the host
numbers on).
"""
