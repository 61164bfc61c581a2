"""Triton kernels of xlt_fast (installed as ``xlt_fast.kernels``).

They run on CUDA tensors, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``
set before ``triton`` is imported). All float32 dot products use ``input_precision="ieee"``: no
TF32 unless asked.
"""
