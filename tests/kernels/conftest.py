"""Kernel tests of the C library run once per ISA build this CPU runs: an AVX-512 machine tests the AVX2 build
too (x86-64-v3: 16 vector registers), so both variants are checked on every CI machine."""

import pytest

from packserve.kernels import cpu_lib


@pytest.fixture(params=cpu_lib.supported_isas() or ["none"])
def each_isa(request):
    if request.param == "none" or not cpu_lib.wait():
        pytest.skip("the C kernels are not available here")
    before = cpu_lib.loaded_isa()
    cpu_lib.use(request.param)
    yield request.param
    cpu_lib.use(before)
