"""Numbers as people read them: bytes, FLOPs, probabilities, dtype names (one home for each).

Pure functions of numbers; the views and tables use them so that a size or a rate reads
the same everywhere.
"""

from __future__ import annotations

import torch

__all__ = ["si", "nbytes", "flops", "percent", "dtype_name"]


def si(value: float, unit: str) -> str:
    """``497.8 MB``, ``350.4 GFLOP``: decimal (SI) prefixes, as disk and GPU makers use."""
    for prefix in ("", "k", "M", "G", "T", "P"):
        if abs(value) < 1000 or prefix == "P":
            return f"{value:,.0f} {unit}" if prefix == "" else f"{value:.1f} {prefix}{unit}"
        value /= 1000
    raise AssertionError("unreachable")


def nbytes(n: float) -> str:
    """A size in bytes with two decimals: ``1.57 MB``, ``36.9 kB``, ``2.35 GB``."""
    if abs(n) >= 1e9:
        return f"{n / 1e9:,.2f} GB"
    if abs(n) >= 1e6:
        return f"{n / 1e6:,.2f} MB"
    return f"{n / 1e3:,.1f} kB"


def flops(n: float) -> str:
    """Operations with three significant digits: ``2.85 GFLOP``."""
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} FLOP"


def percent(p: float) -> str:
    """A probability: ``25.3%``, or four decimals below 0.1% (``0.0253%``)."""
    return f"{p:.1%}" if p >= 0.001 else f"{p:.4%}"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``bfloat16``."""
    return str(dtype).removeprefix("torch.")
