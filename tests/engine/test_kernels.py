"""Integer GEMM paths: every path equals the int64 reference exactly, whatever the shape, layout, dtype and bits."""

from __future__ import annotations

import itertools

import pytest
import torch

from qanalyze.engine import kernels
from qanalyze.engine.avx2_gemm import avx2_int8_mm_op
from qanalyze.engine.kernels import KERNEL_PATHS, int_mm, reference_mm, safe_int_mm
from qanalyze.errors import ConfigError

BITS = (2, 8, 9, 12, 16)  # one of each class: narrow, int8's limit, just split, mid, widest
SHAPES = ((1, 7, 13), (5, 1, 3), (17, 64, 8), (33, 70, 9), (67, 150, 91))


def _qmax(bits):
    return 2 ** (bits - 1) - 1


def _dtype(bits):
    return torch.int8 if bits <= 8 else torch.int16


def _codes(shape, bits, generator, dtype=None):
    top = _qmax(bits)
    return torch.randint(-top, top + 1, shape, generator=generator).to(dtype or _dtype(bits))


def _operands(m, k, n, bits_a, bits_b, generator, *, a_t=False, b_t=False, dtype_a=None, dtype_b=None):
    """(a, b) of shapes (m, k), (k, n); a transposed flag makes that operand a .t() view of a contiguous tensor."""
    a = _codes((k, m), bits_a, generator, dtype_a).t() if a_t else _codes((m, k), bits_a, generator, dtype_a)
    b = _codes((n, k), bits_b, generator, dtype_b).t() if b_t else _codes((k, n), bits_b, generator, dtype_b)
    return a, b


def _paths(bits_a, bits_b):
    avx2 = ("avx2",) if avx2_int8_mm_op() is not None else ()
    return ("auto", "split", "float", "reference", *avx2) + (("int8",) if max(bits_a, bits_b) <= 8 else ())


def _assert_exact(a, b, bits_a, bits_b):
    expected = reference_mm(a, b)
    assert expected.dtype == torch.int64
    for path in _paths(bits_a, bits_b):
        got = int_mm(a, b, bits_a=bits_a, bits_b=bits_b, path=path)
        assert got.shape == expected.shape and got.dtype in (torch.int32, torch.int64), path
        assert torch.equal(got.to(torch.int64), expected), f"path {path}, bits {bits_a} x {bits_b}"


def test_registry_names_the_five_paths():
    assert set(KERNEL_PATHS) == {"int8", "split", "float", "reference", "avx2"}


@pytest.mark.parametrize(("bits_a", "bits_b"), list(itertools.product(BITS, BITS)))
def test_every_path_is_exact_on_random_shapes_and_layouts(bits_a, bits_b):
    generator = torch.Generator().manual_seed(1000 * bits_a + bits_b)
    for (m, k, n), (a_t, b_t) in itertools.product(SHAPES, itertools.product((False, True), repeat=2)):
        a, b = _operands(m, k, n, bits_a, bits_b, generator, a_t=a_t, b_t=b_t)
        _assert_exact(a, b, bits_a, bits_b)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_any_signed_integer_dtype_holding_the_codes(dtype):
    generator = torch.Generator().manual_seed(7)
    for bits_a, bits_b in ((8, 8), (2, 8), (8, 16), (16, 12)):
        if dtype == torch.int8 and max(bits_a, bits_b) > 8:
            # wide bits, narrow values: int8 storage of 16-bit codes that happen to be small
            a, b = _operands(19, 45, 23, 8, 8, generator, b_t=True)
        else:
            a, b = _operands(19, 45, 23, bits_a, bits_b, generator, b_t=True, dtype_a=dtype, dtype_b=dtype)
        _assert_exact(a, b, bits_a, bits_b)


@pytest.mark.parametrize(("bits_a", "bits_b"), list(itertools.product(BITS, BITS)))
def test_extreme_codes(bits_a, bits_b):
    """All +qmax, all -qmax and alternating signs: the digit split's edge values (16 bits: +32767)."""
    qa, qb = _qmax(bits_a), _qmax(bits_b)
    m, k, n = 3, 40, 5

    def alternating(rows, cols, top):
        return (1 - 2 * (torch.arange(rows * cols) % 2)).reshape(rows, cols) * top

    cases = [
        (torch.full((m, k), qa), torch.full((k, n), qb)),
        (torch.full((m, k), -qa), torch.full((k, n), qb)),
        (torch.full((m, k), -qa), torch.full((k, n), -qb)),
        (alternating(m, k, qa), torch.full((k, n), qb)),
        (torch.full((m, k), qa), alternating(k, n, qb)),
    ]
    for a, b in cases:
        a, b = a.to(_dtype(bits_a)), b.to(_dtype(bits_b))
        _assert_exact(a, b, bits_a, bits_b)
        _assert_exact(a, b.t().contiguous().t(), bits_a, bits_b)


def test_sixteen_bit_products_beyond_int32_are_exact():
    # 4096 * 32767**2 ~ 4.4e12: far beyond int32, every partial product must combine exactly
    k = 4096
    generator = torch.Generator().manual_seed(3)
    a = torch.full((3, k), 32767, dtype=torch.int16)
    b = torch.full((k, 5), 32767, dtype=torch.int16)
    got = int_mm(a, b, bits_a=16, bits_b=16)
    assert got.dtype == torch.int64 and torch.equal(got, torch.full((3, 5), k * 32767**2))
    _assert_exact(a, -b.t().contiguous().t(), 16, 16)
    _assert_exact(*_operands(9, k, 11, 16, 16, generator, b_t=True), 16, 16)
    _assert_exact(*_operands(9, k, 11, 8, 16, generator, a_t=True), 8, 16)


def test_int8_path_cuts_k_where_the_int32_accumulator_would_overflow():
    k = 140_000  # 140000 * 127 * 127 = 2.26e9 > 2**31 - 1
    a = torch.full((2, k), 127, dtype=torch.int8)
    b = torch.full((k, 3), 127, dtype=torch.int8)
    for path in ("int8", "auto"):
        got = int_mm(a, b, bits_a=8, bits_b=8, path=path)
        assert got.dtype == torch.int64 and torch.equal(got, torch.full((2, 3), k * 127 * 127))
    generator = torch.Generator().manual_seed(5)
    _assert_exact(*_operands(2, k, 3, 8, 8, generator, b_t=True), 8, 8)


def test_split_path_cuts_k_beyond_its_int32_levels():
    k = kernels._split_k_step(16, 16) + 1000
    a = torch.full((2, k), 32767, dtype=torch.int16)
    b = torch.full((k, 2), -32767, dtype=torch.int16)
    got = int_mm(a, b, bits_a=16, bits_b=16)
    assert got.dtype == torch.int64 and torch.equal(got, torch.full((2, 2), -k * 32767**2))
    _assert_exact(*_operands(2, k, 3, 16, 16, torch.Generator().manual_seed(29), a_t=True, b_t=True), 16, 16)


def test_result_is_int32_exactly_when_it_provably_fits():
    generator = torch.Generator().manual_seed(11)
    a, b = _operands(4, 384, 6, 8, 16, generator)
    assert int_mm(a, b, bits_a=8, bits_b=16, path="split").dtype == torch.int32  # 384 * 127 * 32767 < 2**31
    a, b = _operands(4, 512, 6, 8, 16, generator)
    assert int_mm(a, b, bits_a=8, bits_b=16, path="split").dtype == torch.int32  # the largest K split keeps int32
    a, b = _operands(4, 513, 6, 8, 16, generator)
    assert int_mm(a, b, bits_a=8, bits_b=16, path="split").dtype == torch.int64
    # the float path's bound is the product's own: K * qmax_a * qmax_b
    assert int_mm(a, b, bits_a=8, bits_b=16, path="float").dtype == torch.int32  # 513 * 127 * 32767 < 2**31
    a, b = _operands(4, 517, 6, 8, 16, generator)
    assert int_mm(a, b, bits_a=8, bits_b=16, path="float").dtype == torch.int64
    a, b = _operands(4, 2, 6, 16, 16, generator)
    assert int_mm(a, b, bits_a=16, bits_b=16, path="split").dtype == torch.int64
    a, b = _operands(4, 384, 6, 8, 8, generator)
    for path in ("int8", "float", "auto"):
        assert int_mm(a, b, bits_a=8, bits_b=8, path=path).dtype == torch.int32
    assert reference_mm(a, b).dtype == torch.int64


def test_float_path_cuts_k_where_float32_would_round():
    # 5000 * 127 * 127 = 8.1e7 > 2**24: one float32 GEMM would round; chunks of 1040 columns do not
    k = 5000
    a = torch.full((2, k), 127, dtype=torch.int8)
    b = torch.full((k, 3), -127, dtype=torch.int8)
    got = int_mm(a, b, bits_a=8, bits_b=8, path="float")
    assert got.dtype == torch.int32 and torch.equal(got, torch.full((2, 3), -k * 127 * 127, dtype=torch.int32))
    b = torch.randint(-127, 128, (k, 3), generator=torch.Generator().manual_seed(30)).to(torch.int8)
    assert torch.equal(int_mm(a, b, bits_a=8, bits_b=8, path="float").to(torch.int64), reference_mm(a, b))


def test_float_path_without_full_float32_precision_works_in_float64():
    generator = torch.Generator().manual_seed(31)
    a, b = _operands(40, 3000, 30, 8, 8, generator, a_t=True)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # lets BLAS round float32 inputs to bfloat16
        assert not kernels._float32_is_exact(a.device)
        assert torch.equal(int_mm(a, b, bits_a=8, bits_b=8, path="float").to(torch.int64), reference_mm(a, b))
    finally:
        torch.set_float32_matmul_precision(previous)
    assert kernels._float32_is_exact(a.device)


def test_auto_takes_the_float_path_where_int8_gemms_are_slow(monkeypatch):
    device = torch.device("cpu")
    assert isinstance(kernels.int8_gemm_is_fast(device), bool)
    assert kernels.int8_gemm_is_fast("cpu") is kernels.int8_gemm_is_fast(device)  # measured once
    monkeypatch.delenv(kernels.KERNEL_ENV, raising=False)
    monkeypatch.setattr(kernels, "int8_gemm_is_fast", lambda device: False)
    monkeypatch.setattr(kernels, "_cpu_fallback", lambda narrow: "float")
    assert {kernels._auto_path(x, y, device) for x, y in ((8, 8), (16, 8), (4, 16))} == {"float"}
    monkeypatch.setattr(kernels, "_cpu_fallback", lambda narrow: "avx2" if narrow else "float")
    assert [kernels._auto_path(x, y, device) for x, y in ((8, 8), (16, 8), (4, 16))] == ["avx2", "float", "float"]
    monkeypatch.setattr(kernels, "int8_gemm_is_fast", lambda device: True)
    assert [kernels._auto_path(x, y, device) for x, y in ((8, 8), (16, 8), (2, 9))] == ["int8", "split", "split"]


@pytest.mark.parametrize(("bits_a", "bits_b"), [(16, 16), (8, 16), (16, 8), (12, 16), (9, 9)])
@pytest.mark.parametrize("k", [300, 700])  # below / above the K where a 16 x 16 or 8 x 16 product leaves int32
def test_split_path_blocks_of_rows_including_a_ragged_last_one(monkeypatch, bits_a, bits_b, k):
    monkeypatch.setattr(kernels, "_BLOCK_ELEMENTS", 8 * 11)  # 8 rows a block: 37 rows = 4 full blocks + 5 rows
    generator = torch.Generator().manual_seed(k + 100 * bits_a + bits_b)
    for a_t, b_t in ((False, True), (True, False)):
        a, b = _operands(37, k, 11, bits_a, bits_b, generator, a_t=a_t, b_t=b_t)
        got = int_mm(a, b, bits_a=bits_a, bits_b=bits_b, path="split")
        assert torch.equal(got.to(torch.int64), reference_mm(a, b))
    a = torch.full((37, k), _qmax(bits_a), dtype=_dtype(bits_a))
    b = torch.full((k, 11), -_qmax(bits_b), dtype=_dtype(bits_b))
    assert torch.equal(int_mm(a, b, bits_a=bits_a, bits_b=bits_b, path="split").to(torch.int64), reference_mm(a, b))


@pytest.mark.parametrize(("bits_a", "bits_b"), [(16, 16), (16, 8), (8, 16), (12, 16)])
def test_split_with_and_without_the_offset(bits_a, bits_b):
    """16-bit values above 32639 need x = 256 * hi + lo + 128 and its corrections; others a plain signed split."""
    generator = torch.Generator().manual_seed(23)
    for k, offset_a, offset_b in itertools.product((45, 700), (False, True), (False, True)):
        operands = []
        for bits, shape, offset in ((bits_a, (9, k), offset_a), (bits_b, (k, 7), offset_b)):
            top = min(_qmax(bits), 32639)
            x = torch.randint(-_qmax(bits), top + 1, shape, generator=generator).to(_dtype(bits))
            if offset and bits == 16:
                x[-1, -1] = 32767
            assert kernels._digits(x, bits, dim=0, hi_first=True)[1].offset == (offset and bits == 16)
            operands.append(x)
        _assert_exact(*operands, bits_a, bits_b)
        _assert_exact(operands[0].t().contiguous().t(), operands[1].t().contiguous().t(), bits_a, bits_b)


def test_empty_operands():
    for m, k, n in ((0, 5, 3), (3, 0, 4), (3, 5, 0)):
        for bits_a, bits_b in ((8, 8), (16, 16), (8, 12)):
            a = torch.zeros(m, k, dtype=torch.int16)
            b = torch.zeros(k, n, dtype=torch.int16)
            _assert_exact(a, b, bits_a, bits_b)


def test_inputs_are_not_modified():
    generator = torch.Generator().manual_seed(13)
    a, b = _operands(20, 30, 10, 16, 16, generator, b_t=True)
    a0, b0 = a.clone(), b.clone()
    for path in ("split", "float", "reference"):
        int_mm(a, b, bits_a=16, bits_b=16, path=path)
    assert torch.equal(a, a0) and torch.equal(b, b0)


def test_safe_int_mm_copes_with_strides_the_cpu_kernel_misreads():
    # x.t() of an (n, 1) matrix has strides (1, 1): torch._int_mm returns uninitialized memory for it
    generator = torch.Generator().manual_seed(17)
    row = _codes((3, 1), 8, generator).t()
    assert row.shape == (1, 3) and row.stride() == (1, 1)
    cases = [
        (_codes((5, 1), 8, generator), row),  # b (1, N) with strides (1, 1)
        (row, _codes((3, 4), 8, generator)),  # a (1, K) with strides (1, 1)
        (row, _codes((4, 3), 8, generator).t()),  # and a transposed b
        (_codes((1, 6), 8, generator).t().t(), _codes((6, 1), 8, generator)),
    ]
    for a, b in cases:
        assert torch.equal(safe_int_mm(a, b).to(torch.int64), reference_mm(a, b))
        assert torch.equal(int_mm(a, b, bits_a=8, bits_b=8).to(torch.int64), reference_mm(a, b))


def test_cublas_padding_keeps_the_product_exact():
    generator = torch.Generator().manual_seed(19)
    for m, k, n in ((1, 7, 13), (16, 8, 8), (17, 9, 1), (40, 24, 16), (3, 0, 5)):
        a, b = _operands(m, k, n, 8, 8, generator, b_t=True)
        a_pad, b_pad = kernels._cublas_operands(a, b)
        assert a_pad.shape[0] > 16 and a_pad.shape[1] % 8 == 0 and a_pad.shape[1] > 0
        assert b_pad.shape[1] % 8 == 0 and b_pad.shape[1] > 0 and a_pad.shape[1] == b_pad.shape[0]
        assert a_pad.is_contiguous() and b_pad.is_contiguous()
        # safe_int_mm, not torch._int_mm: the CPU product is exact even under a oneDNN cap below VNNI
        assert torch.equal(safe_int_mm(a_pad, b_pad)[:m, :n].to(torch.int64), reference_mm(a, b))


@pytest.mark.parametrize(
    ("a", "b", "kwargs", "match"),
    [
        (torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.int8), {}, "integer codes"),
        (torch.zeros(2, 3, dtype=torch.int8), torch.zeros(3, 2, dtype=torch.uint8), {}, "integer codes"),
        (torch.zeros(2, 3, dtype=torch.bool), torch.zeros(3, 2, dtype=torch.int8), {}, "integer codes"),
        (torch.zeros(3, dtype=torch.int8), torch.zeros(3, 2, dtype=torch.int8), {}, "2-D"),
        (torch.zeros(1, 2, 3, dtype=torch.int8), torch.zeros(3, 2, dtype=torch.int8), {}, "2-D"),
        (torch.zeros(2, 3, dtype=torch.int8), torch.zeros(4, 2, dtype=torch.int8), {}, "do not chain"),
        (torch.zeros(2, 3, dtype=torch.int8), torch.zeros(3, 2, dtype=torch.int8), {"bits_a": 1}, "bits"),
        (torch.zeros(2, 3, dtype=torch.int8), torch.zeros(3, 2, dtype=torch.int8), {"bits_b": 17}, "bits"),
        (torch.zeros(2, 3, dtype=torch.int8), torch.zeros(3, 2, dtype=torch.int8), {"bits_a": True}, "bits"),
        (torch.zeros(2, 3, dtype=torch.int8), torch.zeros(3, 2, dtype=torch.int8), {"bits_b": 8.0}, "bits"),
        (torch.zeros(2, 3, dtype=torch.int8), torch.zeros(3, 2, dtype=torch.int8), {"path": "fast"},
         "known: auto, .*int8"),
        (torch.zeros(2, 3, dtype=torch.int16), torch.zeros(3, 2, dtype=torch.int8), {"bits_a": 9, "path": "int8"},
         "at most 8 bits"),
        (torch.zeros(2, 3, dtype=torch.int8), torch.zeros(3, 2, dtype=torch.int8, device="meta"), {}, "on cpu"),
    ],
)
def test_bad_arguments_raise_config_error(a, b, kwargs, match):
    settings = {"bits_a": 8, "bits_b": 8, **kwargs}
    with pytest.raises(ConfigError, match=match):
        int_mm(a, b, **settings)


def test_safe_int_mm_and_reference_validate_their_operands():
    with pytest.raises(ConfigError, match="int8"):
        safe_int_mm(torch.zeros(2, 3, dtype=torch.int16), torch.zeros(3, 2, dtype=torch.int8))
    with pytest.raises(ConfigError, match=r"\(M, K\) and \(K, N\)"):
        safe_int_mm(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2, 2, dtype=torch.int8))
    with pytest.raises(ConfigError, match="integer"):
        reference_mm(torch.zeros(2, 3), torch.zeros(3, 2))


@pytest.mark.parametrize("cap", ["AVX2", "avx512_core", "DNNL:AVX"])
def test_a_onednn_cap_below_vnni_keeps_int_mm_exact(monkeypatch, cap):
    # oneDNN capped below VNNI (how an AVX2-only machine is emulated on a VNNI one) sums u8 x s8 pairs in
    # saturating 16-bit lanes; safe_int_mm must then not trust torch._int_mm
    from qanalyze.cpu import onednn_int8_is_exact

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert onednn_int8_is_exact()
    name, _, value = cap.rpartition(":")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA" if name else "ONEDNN_MAX_CPU_ISA", value)
    assert not onednn_int8_is_exact()
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (64, 384), generator=generator, dtype=torch.int32).to(torch.int8)
    b = torch.randint(-128, 128, (384, 48), generator=generator, dtype=torch.int32).to(torch.int8)
    product = safe_int_mm(a, b)
    assert product.dtype == torch.int32 and torch.equal(product.long(), a.long() @ b.long())
    out = torch.empty(64, 48, dtype=torch.int32)
    assert safe_int_mm(a, b, out=out) is out and torch.equal(out, product)
