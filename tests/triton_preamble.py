"""Import this first in a test of the Triton kernels: it runs them in Triton's interpreter on the CPU.

Triton decides when a kernel is decorated whether it is compiled or interpreted,
so TRITON_INTERPRET=1 must be set before anything imports the kernel modules
(set it yourself when importing them elsewhere on a CPU). The module then loads
`native` (which sets OpenMP's wait policy before torch loads) and skips the
importing test module where Triton is missing, or where the interpreter was
turned off (a machine with a GPU runs `native.kernel_check.selfcheck` instead).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import native  # noqa: E402,F401

import pytest  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed (it comes with the 'test' extra on Linux)")

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("these tests need Triton's interpreter (TRITON_INTERPRET=1) on a machine without a GPU",
                allow_module_level=True)
