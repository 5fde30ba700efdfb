"""The benchmarks: one harness (``bench.harness``) and one small script per figure.

Run from the repository root, as a module (``python -m bench.reader``) or as a file
(``python bench/reader.py``); ``bench/run.py`` runs P1-P4 in one go. bench/ is not installed.
"""
