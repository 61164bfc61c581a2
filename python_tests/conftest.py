"""Shared test set-up: which kernel backends run here, and on which device.

Without a GPU, Triton kernels run on CPU tensors under the Triton interpreter; the variable must
be set before triton is first imported, hence here at collection time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from xlt_fast import _backend  # noqa: E402

GPU = torch.cuda.is_available()
# Exactness first: TF32 stays off for every comparison.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def kernel_backends(*available: str) -> list:
    """``(backend, device)`` pairs to test among ``available`` kernels, as pytest params."""
    pairs = []
    for name in available:
        if name == "cpu":
            pairs.append(("cpu", "cpu"))
        elif name == "triton":
            pairs.append(("triton", "cuda" if GPU else "cpu"))
        elif name == "cuda":
            pairs.append(pytest.param("cuda", "cuda", marks=pytest.mark.skipif(
                not (GPU and _backend.has_cuda_kernels()), reason="CUDA kernels need a GPU and a CUDA build")))
    return pairs


def pytest_report_header(config):
    return (f"torch {torch.__version__}, GPU: {torch.cuda.get_device_name() if GPU else 'none'}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, "
            f"CUDA kernels: {_backend.has_cuda_kernels()}")


@pytest.fixture
def one_thread():
    """One intra-op thread inside the test: steps on 2-D or 32-d rows take milliseconds, and OpenMP
    spin contention on a shared 2-core machine makes them several times slower with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

