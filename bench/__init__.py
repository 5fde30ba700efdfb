"""The benchmarks: one harness (``bench.harness``) and one small script per figure.

Run from the repository root as modules (``python -m bench.reader``); ``python bench/run.py``
runs P1-P4 in one go. bench/ is not installed.
"""
