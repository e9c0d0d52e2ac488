"""loom's own CPU kernels as torch operators (`torch.ops.loom.*`).

csrc/        the C sources (package data): thread pool, dense GEMM, RMSNorm, decode attention, int8, int4
build.py     builds, validates, caches and loads the library for the instruction-set level chosen at run time
signatures   the ctypes signatures, matching csrc/loom_kernels.h
ops.py       the operator registrations: checks, CPU and fake implementations, autograd
policy.py    when a kernel applies (row limits, dtypes, the bf16 rule, which tensors may reach C)
linear.py    KernelLinear and `use_kernels_`, the fast path for plain Linears applied from outside the models
threads.py   thread counts and the decode loop's hand-off between torch and the kernels' pool

This package imports nothing else from loom; it is the only place with ctypes and raw pointers.
"""
from loom.kernels import ops  # noqa: F401  (registers torch.ops.loom.*)
from loom.kernels.linear import KernelLinear, is_plain_linear, linear_act, use_kernels_

__all__ = ["KernelLinear", "is_plain_linear", "linear_act", "use_kernels_"]
