"""After (or beside) a run: event files read back, run summaries, the demo and its patients.

Must not import Lightning at module level, so ``lightning-health report`` starts fast.
"""
