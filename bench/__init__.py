"""sparsekern benchmarks: ``python -m bench`` (every family and the training step: summary,
JSON, Markdown, plots; ``bench/families.py``, ``bench/report.py``), ``python -m bench.readme``
(README section from a results file) and the pytest-benchmark files ``bench/bench_<family>.py``;
shared machinery in ``bench/harness.py``."""
