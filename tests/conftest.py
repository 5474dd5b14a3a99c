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

if not os.environ.get("OMP_NUM_THREADS"):  # CI's second numeric run sets 1: keep it
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "numeric: compares model numbers; .ci/run runs these files again on another CPU code path "
        "(ATEN_CPU_CAPABILITY=avx2, OMP_NUM_THREADS=1)",
    )


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


#: Token-equality tests compare greedy choices made through different kernels (cached vs
#: uncached, batched vs alone, ours vs transformers), whose float32 logits agree to within 1e-5 (asserted elsewhere).
#: A choice is only robust when the top-1 logit leads the runner-up by far more than that:
#: tests check this margin on their inputs, so a near-tie fails loudly as "pick another input"
#: instead of flipping a token on some CPU.
TOP1_MARGIN = 1e-4  # 10x the 1e-5 agreement the tests require between code paths


def assert_clear_top1(logits: torch.Tensor, margin: float = TOP1_MARGIN) -> None:
    """Every row of ``(..., vocab)`` logits has its top-1 ahead of the runner-up by ``margin``."""
    top2 = logits.float().topk(2, dim=-1).values
    gaps = (top2[..., 0] - top2[..., 1]).flatten()
    worst = int(gaps.argmin())
    assert gaps[worst] > margin, (f"near-tie at row {worst}: top-1 leads by only {gaps[worst].item():.2e} "
                                  f"(< {margin}); choose inputs whose greedy choices are clearly separated")


def count_forwards(monkeypatch, model) -> list[int]:
    """How many times ``model`` runs its forward from now on (one counter in a list)."""
    calls, forward = [0], model.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counted)
    return calls


# --------------------------------------------------------------------------- the app (gptviz.ui)


def visit(session_hash: str):
    """What a handler reads from Gradio's request: one ``session_hash`` is one visitor (browser tab)."""
    import types

    return types.SimpleNamespace(session_hash=session_hash)


@pytest.fixture(scope="session")
def ui_models():
    """Models built once for the whole run and shared by the test contexts, read-only, as the
    app shares them between visitors (tests that count builds make their own ModelStore)."""
    from gptviz.ui.serving import ModelStore, build_model

    return ModelStore(lambda spec: build_model(spec, torch.device("cpu")), capacity=8)


@pytest.fixture
def make_ctx(tiny_cfg, ui_models):
    """``make_ctx(cfg=None, **limits)``: a fresh AppContext on the CPU (its own visitors, the
    run's shared models) whose visitors start with random weights (seed 123) of ``cfg`` (the
    tiny configuration by default), with those :class:`~gptviz.settings.Settings` limits."""
    from gptviz.settings import RANDOM, Settings
    from gptviz.ui.serving import AppContext, ModelSpec

    def make(cfg: GPTConfig | None = None, **limits) -> "AppContext":
        ctx = AppContext(Settings(device="cpu", **limits), default_spec=ModelSpec(RANDOM, cfg or tiny_cfg))
        ctx.models = ui_models
        return ctx

    return make


@pytest.fixture
def ctx(make_ctx):
    """A fresh AppContext on the tiny model with the default limits."""
    return make_ctx()


def seeded(cfg: GPTConfig) -> GPTModel:
    """Random weights as the app makes them: ``torch.manual_seed(123)`` before ``GPTModel(cfg)``."""
    torch.manual_seed(123)
    return GPTModel(cfg).eval()


def source_greedy(model: GPTModel, ids: list[int], n: int) -> list[int]:
    """The source's generate_text_simple, uncached, as the reference for the app's tokens."""
    idx = torch.tensor([ids])
    ctx = model.cfg.context_length
    with torch.no_grad():
        for _ in range(n):
            logits = model(idx[:, -ctx:])[:, -1, :]
            idx = torch.cat([idx, torch.argmax(torch.softmax(logits, -1), -1, keepdim=True)], dim=1)
    return idx[0].tolist()
