"""Readable numbers: one format per quantity, wherever it is shown."""

from __future__ import annotations

import pytest
import torch

from gptviz.formatting import dtype_name, flops, nbytes, percent, si


@pytest.mark.parametrize("value, unit, text", [
    (0, "B", "0 B"), (999, "B", "999 B"), (1000, "B", "1.0 kB"), (497_758_208, "B", "497.8 MB"),
    (652_038_144, "B", "652.0 MB"), (3.5e12, "FLOP", "3.5 TFLOP"), (2e18, "B", "2000.0 PB"),
])
def test_si_prefixes(value, unit, text):
    assert si(value, unit) == text


@pytest.mark.parametrize("n, text", [(36_864, "36.9 kB"), (1_572_864, "1.57 MB"), (2_350_000_000, "2.35 GB"),
                                     (0, "0.0 kB")])
def test_nbytes(n, text):
    assert nbytes(n) == text


@pytest.mark.parametrize("n, text", [(12, "12 FLOP"), (2_850_000_000, "2.85 GFLOP"), (1.234e12, "1.23 TFLOP"),
                                     (5_000, "5 kFLOP")])
def test_flops(n, text):
    assert flops(n) == text


def test_percent_keeps_small_probabilities_readable():
    assert percent(0.253) == "25.3%" and percent(1.0) == "100.0%"
    assert percent(0.000253) == "0.0253%"


def test_dtype_names():
    assert [dtype_name(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == ["float32", "bfloat16", "float16"]
