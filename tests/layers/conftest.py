"""Fixtures of the native kernels' tests (test_token_blocks.py, test_conv_token_blocks.py)."""

from __future__ import annotations

import pytest

from hybridzoo.layers import native
from _helpers import kernels_with_isa  # tests/conftest.py puts tests/ on sys.path


@pytest.fixture(scope="module", params=["avx512", "avx2"])
def kernels(request):
    """The kernels with each instruction set this CPU has (an AVX-512 machine tests the AVX2 kernels too)."""
    if not native.load():
        pytest.skip("no C++ compiler or ninja to build the native kernels")
    with kernels_with_isa(native, request.param) as k:
        yield k
