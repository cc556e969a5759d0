"""Pure on-device torch functions: one tensor in, raw totals out (moments, counts, histograms, unit masks).

A new reading goes here first, as a function testable against a NumPy reference. Imports only torch.
"""
