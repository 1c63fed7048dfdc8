"""Budget strings -> Budget, and the storage they allow."""

from __future__ import annotations

import pytest

from qanalyze.errors import ConfigError
from qanalyze.plan.budget import SCALE_BITS, Budget, BudgetError, parse_bits, parse_budget


@pytest.mark.parametrize(("text", "kind", "value"), [
    ("4bit", "bits", 4.0),
    ("4 bits", "bits", 4.0),
    ("3.5bit", "bits", 3.5),
    (" 3.5 BIT ", "bits", 3.5),
    ("32bit", "bits", 32.0),
    ("12MB", "bytes", 12e6),
    ("12mb", "bytes", 12e6),
    ("12MiB", "bytes", 12 * 2**20),
    ("0.5GB", "bytes", 0.5e9),
    ("1GiB", "bytes", 2**30),
    ("1 gib", "bytes", 2**30),
    ("500KB", "bytes", 5e5),
    ("8x", "ratio", 8.0),
    ("8 X", "ratio", 8.0),
    ("1x", "ratio", 1.0),
])
def test_every_form_parses_to_its_number(text, kind, value):
    budget = parse_budget(text)
    assert (budget.text, budget.kind, budget.value) == (text, kind, value)


def test_decimal_and_binary_prefixes_differ():
    assert parse_budget("12MiB").value / parse_budget("12MB").value == pytest.approx(2**20 / 1e6)


@pytest.mark.parametrize("text", ["", "4", "four bits", "4bitt", "4 b", "-4bit", "0bit", "0x", "0MB", "33bit",
                                  "0.5x", "4bit 2", "1e3bit", "nanbit", "12 M B", "4,5bit"])
def test_bad_forms_raise_budget_error_naming_the_forms(text):
    with pytest.raises(BudgetError, match=r"4bit, 3\.5bit, 12MB, 12MiB, 0\.5GB, 8x"):
        parse_budget(text)


def test_budget_error_is_a_config_error():
    assert issubclass(BudgetError, ConfigError)
    with pytest.raises(ConfigError):
        parse_budget(4)  # type: ignore[arg-type]


def test_capacity_bits_per_kind():
    assert parse_budget("4bit").capacity_bits(1000, tensors=0) == 4000.0
    assert parse_budget("3.5bit").capacity_bits(1000, tensors=0) == 3500.0
    assert parse_budget("12MB").capacity_bits(10**9, tensors=3) == 96e6  # bytes do not depend on the weight count
    assert parse_budget("1MiB").capacity_bits(5, tensors=1) == 8 * 2**20
    assert parse_budget("8x").capacity_bits(1000, tensors=2) == 4000.0  # a ratio counts every scale
    assert parse_budget("4bit").capacity_bits(0, tensors=0) == 0.0
    for params, tensors in ((-1, 0), (10, -1), (10, 1.5), (10, True)):
        with pytest.raises(ConfigError):
            parse_budget("4bit").capacity_bits(params, tensors=tensors)


def test_a_bits_budget_lets_the_first_scale_of_each_tensor_go_free():
    # 16 bits everywhere at one fp16 scale per tensor is exactly a 16bit budget, and 2 bits a 2bit one
    for bits in (2, 4, 16):
        tensors = [(64, 32), (128, 32), (10, 3)]
        per_tensor = sum(bits * rows * cols + SCALE_BITS for rows, cols in tensors)
        params = sum(rows * cols for rows, cols in tensors)
        assert parse_budget(f"{bits}bit").capacity_bits(params, tensors=len(tensors)) == per_tensor
    # a finer layout pays for every scale past the first: per channel, 63 more on a 64-row tensor
    assert parse_budget("4bit").capacity_bits(64 * 32, tensors=1) < 4 * 64 * 32 + SCALE_BITS * 64


def test_to_dict_and_frozen():
    budget = parse_budget("12MiB")
    assert budget.to_dict() == {"text": "12MiB", "kind": "bytes", "value": 12 * 2**20}
    with pytest.raises(AttributeError):
        budget.value = 1.0  # type: ignore[misc]
    with pytest.raises(BudgetError):
        Budget(text="4", kind="watts", value=4.0)


@pytest.mark.parametrize(("text", "value"), [("8bit", 8.0), ("8", 8.0), ("8 bits", 8.0), ("2", 2.0),
                                             ("16bit", 16.0), ("6.5bit", 6.5)])
def test_parse_bits(text, value):
    assert parse_bits(text) == value


@pytest.mark.parametrize("text", ["1bit", "17", "8MB", "8x", "", "eight", "0"])
def test_parse_bits_rejects(text):
    with pytest.raises(BudgetError):
        parse_bits(text)


def test_bops_budgets():
    from qanalyze.plan.budget import parse_bops

    assert parse_bops("2e12") == 2e12
    assert parse_bops("500G") == 5e11
    assert parse_bops("1.5T") == 1.5e12
    for bad in ("", "-3G", "2Q", "0"):
        with pytest.raises(BudgetError, match="500G"):
            parse_bops(bad)
