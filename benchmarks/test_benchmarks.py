"""The benchmark cases under pytest-benchmark: ``pytest benchmarks [--benchmark-only]``.

One test per (case, implementation) of the quick grid on this machine's device; pytest-benchmark
does the timing and statistics, and each test of an xlt_fast implementation checks it against the
case's reference first (``case.tolerance`` of the output's scale, 1e-4 unless the case says why
not), so a fast wrong kernel fails here. Peers are timed, not judged: their errors are printed by
``xlt-fast bench`` (GeomLoss tensorized shares one diameter over a padded batch, for example).
"""
import pytest
import torch

from xlt_fast.benchmarks import harness

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [case for mod in harness.discover() for case in mod.cases(DEVICE, quick=True)]
PARAMS = [pytest.param(case, name, id=f"{case.op}-{case.shape}-{case.mode}-{name}")
          for case in CASES for name in case.impls]


@pytest.mark.parametrize("case,name", PARAMS)
def test_case(benchmark, case, name):
    fn = case.impls[name]
    if case.reference and name != case.reference and name.startswith("xlt_fast"):
        assert harness.max_error(fn(), case.impls[case.reference]()) < case.tolerance
    benchmark(fn)
