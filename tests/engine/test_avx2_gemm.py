"""The AVX2 int8 kernel (`qanalyze.engine.avx2_gemm`) and the ``avx2`` path: bit-exact against int64 on odd
shapes, every layout, the kernel's block edges and the extreme codes; `QANALYZE_KERNEL` forcing paths."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from qanalyze.engine import avx2_gemm, kernels
from qanalyze.engine.kernels import int_mm, reference_mm
from qanalyze.errors import ConfigError

needs_kernel = pytest.mark.skipif(avx2_gemm.avx2_int8_mm_op() is None, reason="no AVX2 kernel on this machine")

# odd M, K, N; M beyond one block of 64 rows and not a multiple of the 4-row tile; K beyond one 512 block and odd;
# N not a multiple of the 16-column panel
SHAPES = ((1, 1, 1), (3, 5, 7), (7, 13, 5), (67, 151, 91), (65, 513, 17), (131, 1025, 33), (5, 2049, 3))
# the maddubs4 kernel's edges: 3-row tiles and 48-row blocks (M 2, 4, 47, 49, 97), k in quads (K 3, 4, 5), 8 quads
# summed in int16 before widening (K 31, 32, 33, 63), 512-k blocks (K 511, 512, 515), 16-column panels (N 15, 16, 17)
SHAPES_U4 = ((2, 3, 15), (4, 4, 16), (47, 5, 17), (49, 31, 16), (97, 32, 33), (3, 33, 1), (50, 63, 31),
             (48, 511, 16), (6, 512, 48), (11, 515, 9))
VARIANTS = tuple(avx2_gemm.KERNEL_VARIANTS)
"""Every kernel variant in the library: the ``avx2`` path's and the benchmarked maddubs4 one."""


def _codes(shape, bits, generator):
    top = 2 ** (bits - 1) - 1
    return torch.randint(-top, top + 1, shape, generator=generator).to(torch.int8 if bits <= 8 else torch.int16)


def _layouts(m, k, n, bits_a, bits_b, generator):
    """(a, b) in the four row- / column-major combinations, plus a sliced (non-unit leading stride) pair."""
    for a_t, b_t in itertools.product((False, True), repeat=2):
        a = _codes((k, m), bits_a, generator).t() if a_t else _codes((m, k), bits_a, generator)
        b = _codes((n, k), bits_b, generator).t() if b_t else _codes((k, n), bits_b, generator)
        yield a, b
    yield _codes((m, 2 * k + 1), bits_a, generator)[:, 1::2], _codes((k, n + 3), bits_b, generator)[:, 2:n + 2]


@needs_kernel
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("m", "k", "n"), SHAPES + SHAPES_U4)
def test_kernel_is_exact_on_odd_shapes_and_every_layout(variant, m, k, n):
    op = avx2_gemm.avx2_int8_mm_variant(variant)
    generator = torch.Generator().manual_seed(m * 10007 + k * 101 + n)
    for a, b in _layouts(m, k, n, 8, 8, generator):
        got = op(a, b)
        assert got.dtype == torch.int32 and got.shape == (m, n)
        assert torch.equal(got.to(torch.int64), reference_mm(a, b))


@needs_kernel
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_extreme_codes_and_the_int8_minimum(variant):
    """+-127 everywhere (the largest pair sums, 2 * 127 * 127), and -128, which no code takes but int8 holds; for
    maddubs4, 127 is the largest digits (15, 15) and -128 on B the most negative digit pair sums (-3840)."""
    op = avx2_gemm.avx2_int8_mm_variant(variant)
    for value_a, value_b in itertools.product((127, -127, -128, 0), repeat=2):
        a = torch.full((9, 1031), value_a, dtype=torch.int8)
        b = torch.full((1031, 19), value_b, dtype=torch.int8)
        assert torch.equal(op(a, b).to(torch.int64), reference_mm(a, b))
    alternating = (1 - 2 * (torch.arange(70 * 41) % 2)).reshape(70, 41).to(torch.int8) * 127
    assert torch.equal(op(alternating, alternating.t()).to(torch.int64), reference_mm(alternating, alternating.t()))


@needs_kernel
def test_maddubs4_is_exact_where_its_offset_sum_wraps_int32():
    """A + 128 = 255 against 127 over 100,003 k: U @ B (3.2e9) wraps int32 while A @ B (1.6e9) fits; the offset
    correction, also wrapped, gives the exact product (random codes at that K too)."""
    op = avx2_gemm.avx2_int8_mm_variant("maddubs4")
    k = 100_003
    for value_a, value_b in ((127, 127), (127, -128), (-128, -128)):
        a = torch.full((5, k), value_a, dtype=torch.int8)
        b = torch.full((k, 17), value_b, dtype=torch.int8)
        assert torch.equal(op(a, b).to(torch.int64), reference_mm(a, b))
    generator = torch.Generator().manual_seed(7)
    a, b = _codes((4, k), 8, generator), _codes((k, 19), 8, generator)
    assert torch.equal(op(a, b).to(torch.int64), reference_mm(a, b))


@needs_kernel
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_empty_operands(variant):
    op = avx2_gemm.avx2_int8_mm_variant(variant)
    for m, k, n in ((0, 5, 3), (3, 0, 4), (3, 5, 0)):
        got = op(torch.zeros(m, k, dtype=torch.int8), torch.zeros(k, n, dtype=torch.int8))
        assert got.shape == (m, n) and torch.equal(got, torch.zeros(m, n, dtype=torch.int32))


@needs_kernel
@pytest.mark.parametrize(("bits_a", "bits_b"), [(8, 8), (2, 8), (8, 16), (16, 8), (16, 16), (12, 9)])
def test_avx2_path_is_exact_at_every_width(bits_a, bits_b):
    generator = torch.Generator().manual_seed(100 * bits_a + bits_b)
    for m, k, n in ((1, 7, 13), (67, 151, 91), (33, 700, 9)):
        for a, b in _layouts(m, k, n, bits_a, bits_b, generator):
            got = int_mm(a, b, bits_a=bits_a, bits_b=bits_b, path="avx2")
            assert torch.equal(got.to(torch.int64), reference_mm(a, b)), (m, k, n, bits_a, bits_b)
    top_a, top_b = 2 ** (bits_a - 1) - 1, 2 ** (bits_b - 1) - 1
    a = torch.full((5, 40_000), top_a, dtype=torch.int16)  # 16 x 16: beyond the split path's int32 levels
    b = torch.full((40_000, 3), -top_b, dtype=torch.int16)
    assert torch.equal(int_mm(a, b, bits_a=bits_a, bits_b=bits_b, path="avx2").to(torch.int64), reference_mm(a, b))


@needs_kernel
def test_avx2_path_cuts_k_where_int32_would_overflow():
    k = 140_000  # 140000 * 127 * 127 > 2**31 - 1
    a = torch.full((2, k), 127, dtype=torch.int8)
    b = torch.full((k, 3), 127, dtype=torch.int8)
    got = int_mm(a, b, bits_a=8, bits_b=8, path="avx2")
    assert got.dtype == torch.int64 and torch.equal(got, torch.full((2, 3), k * 127 * 127))


@pytest.mark.parametrize(("value", "narrow", "wide"), [
    ("reference", "reference", "reference"), ("float", "float", "float"), ("int_mm", "int8", "split"),
    (" Float ", "float", "float")])
def test_qanalyze_kernel_forces_what_auto_takes(monkeypatch, value, narrow, wide):
    monkeypatch.setenv(kernels.KERNEL_ENV, value)
    cpu = torch.device("cpu")
    assert (kernels._auto_path(8, 8, cpu), kernels._auto_path(16, 8, cpu)) == (narrow, wide)


@needs_kernel
def test_qanalyze_kernel_avx2_forces_the_kernel(monkeypatch):
    monkeypatch.setenv(kernels.KERNEL_ENV, "avx2")
    assert kernels._auto_path(8, 8, torch.device("cpu")) == kernels._auto_path(16, 16, torch.device("cpu")) == "avx2"
    a, b = _codes((9, 31), 8, torch.Generator().manual_seed(1)), _codes((31, 4), 8, torch.Generator().manual_seed(2))
    assert torch.equal(int_mm(a, b, bits_a=8, bits_b=8).to(torch.int64), reference_mm(a, b))


def test_qanalyze_kernel_unknown_value_is_a_config_error(monkeypatch):
    monkeypatch.setenv(kernels.KERNEL_ENV, "vnni")
    with pytest.raises(ConfigError, match="QANALYZE_KERNEL='vnni' is not a kernel; known: auto, reference"):
        kernels.forced_kernel()
    with pytest.raises(ConfigError, match="QANALYZE_KERNEL"):
        int_mm(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(3, 2, dtype=torch.int8), bits_a=8, bits_b=8)


def test_no_kernel_means_float_and_a_clear_error_when_forced(monkeypatch):
    monkeypatch.setattr(kernels, "avx2_int8_mm_op", lambda: None)
    kernels._cpu_fallback.cache_clear()
    try:
        assert kernels._cpu_fallback(True) == "float"
        monkeypatch.setenv(kernels.KERNEL_ENV, "avx2")
        with pytest.raises(ConfigError, match="cannot be built"):
            kernels.forced_kernel()
        with pytest.raises(ConfigError, match="avx2 path"):
            int_mm(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(3, 2, dtype=torch.int8), bits_a=8, bits_b=8,
                   path="avx2")
    finally:
        kernels._cpu_fallback.cache_clear()


def test_a_build_failure_warns_once_and_gives_none(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    def broken_load(**_):
        raise RuntimeError("Error building extension 'x':\nno compiler")

    monkeypatch.setattr(cpp_extension, "load", broken_load)
    monkeypatch.setattr(avx2_gemm, "avx2_available", lambda: True)
    avx2_gemm.avx2_int8_mm_op.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert avx2_gemm.avx2_int8_mm_op() is None
            assert avx2_gemm.avx2_int8_mm_op() is None  # cached: one warning, not one per call
        assert len(caught) == 1 and issubclass(caught[0].category, avx2_gemm.Avx2KernelWarning)
        assert "\n" not in str(caught[0].message) and "no compiler" in str(caught[0].message)
    finally:
        avx2_gemm.avx2_int8_mm_op.cache_clear()


@needs_kernel
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_is_exact_on_one_thread_and_on_several(variant, threads):
    """Row blocks (64 or 48 rows) and B panels are shared among threads (at::parallel_for): every split gives the
    same integers."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(threads)
        a, b = _codes((301, 777), 8, generator), _codes((777, 45), 8, generator)
        assert torch.equal(avx2_gemm.avx2_int8_mm_variant(variant)(a, b).to(torch.int64), reference_mm(a, b))
    finally:
        torch.set_num_threads(previous)
