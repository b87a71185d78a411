"""Benchmarks of supanalysis's ops against the machine's own limits: ``python -m bench``.

One module per concern: :mod:`bench.limits` (read bandwidth and matmul rate measured in the
same run), :mod:`bench.timing` (median times), :mod:`bench.cases` (ops, shapes, baselines),
:mod:`bench.report` (table, Markdown, JSON) and :mod:`bench.runner` (the command line).
"""
