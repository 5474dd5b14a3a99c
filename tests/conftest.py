"""Shared fixtures: small configurations on CPU so the suite stays fast."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from anywhere: `python -m pytest tests`
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("GPTVIZ_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the network

from gptviz import GPTConfig, GPTModel, get_encoding  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def enc():
    return get_encoding()


@pytest.fixture(scope="session")
def tiny_cfg() -> GPTConfig:
    """A small model over the real GPT-2 vocabulary (so the real tokenizer works with it)."""
    return GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1)


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg) -> GPTModel:
    torch.manual_seed(123)
    return GPTModel(tiny_cfg).eval()
