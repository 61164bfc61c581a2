"""Benchmark suites of xlt_fast (installed as ``xlt_fast.benchmarks``).

Each module ``bench_<family>.py`` defines ``cases(device, quick) -> list[Case]``; the runner
(``xlt-fast bench``) and the pytest-benchmark suite (``pytest benchmarks``) discover them.
"""
