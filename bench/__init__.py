"""sparsekern benchmarks: ``python -m bench`` (suite, table, JSON) and pytest-benchmark files
``bench/bench_<family>.py``; shared machinery in ``bench/harness.py``."""
