"""Loading GPT-2 checkpoints: small ones built with transformers, in both file layouts,
compared with transformers' own GPT2LMHeadModel. No test touches the network."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import pickle
import shlex
import shutil
from pathlib import Path

import httpx
import huggingface_hub
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from gptviz import PRESETS, GPTConfig, GPTModel, Trace
from gptviz.files import checkpoints, weights
from gptviz.files.weights import PRETRAINED_NAMES, CheckpointError, NeedsHeadsError, TooLargeError, WeightsError, WeightsSource, config_from_hf, config_from_state_dict, estimated_bytes, hub_repo_id, is_allowed_name, load_pretrained, load_upload, pretrained_config
from gptviz.generation import session as generation
from gptviz.kernels import book_kernels

from . import book_model
from .conftest import assert_clear_top1

pytestmark = pytest.mark.numeric  # .ci/run runs this file again on another CPU code path

N_LAYER, N_POSITIONS, VOCAB = 2, 64, 1000
PROMPT = torch.tensor([[15, 496, 7, 999, 0, 42, 311, 8]])


@pytest.fixture(scope="module")
def hf_model() -> GPT2LMHeadModel:
    """A small random GPT-2. Every parameter is redrawn (HF initialises biases to 0 and
    LayerNorm scales to 1, which would hide a wrongly mapped bias, scale or shift); the
    LayerNorm scales stay near 1 so greedy decoding does not collapse into one token."""
    cfg = GPT2Config(
        n_embd=64, n_head=4, n_layer=N_LAYER, n_positions=N_POSITIONS, vocab_size=VOCAB,
        bos_token_id=None, eos_token_id=None, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(123)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory) -> Path:
    """transformers' own layout: ``transformer.``-prefixed names, no buffers, no lm_head."""
    path = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def bare_dir(hf_dir, tmp_path_factory) -> Path:
    """The Hub files' layout: unprefixed names, ``attn.bias`` / ``attn.masked_bias`` buffers,
    here also an ``lm_head.weight`` equal to ``wte``."""
    state = {k.removeprefix("transformer."): v for k, v in load_file(hf_dir / "model.safetensors").items()}
    for i in range(N_LAYER):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, N_POSITIONS, N_POSITIONS))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    state["lm_head.weight"] = state["wte.weight"].clone()
    return _write(tmp_path_factory.mktemp("bare"), state, hf_dir)


def _write(path: Path, state: dict[str, torch.Tensor], config_from: Path, name: str = "model.safetensors") -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, path / name)
    shutil.copy(config_from / "config.json", path / "config.json")
    return path


def _state(hf_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(hf_dir / "model.safetensors")


@pytest.fixture(params=["hf_dir", "bare_dir"])
def loaded(request) -> GPTModel:
    return load_pretrained(request.getfixturevalue(request.param), device="cpu")


# --------------------------------------------------------------------------- equal to transformers


def test_logits_match_transformers(loaded, hf_model):
    with torch.no_grad():
        ours, theirs = loaded(PROMPT), hf_model(PROMPT).logits
    assert ours.shape == theirs.shape == (1, PROMPT.shape[1], VOCAB)
    assert theirs.std() > 0.1  # far from a flat output
    assert (ours - theirs).abs().max() <= 1e-4


def test_attention_weights_match_transformers_layer_by_layer(loaded, hf_model):
    trace = Trace(names=("attn_weights",))
    with torch.no_grad():
        loaded(PROMPT, trace=trace)
        theirs = hf_model(PROMPT, output_attentions=True).attentions
    assert len(trace.attentions) == len(theirs) == N_LAYER
    for ours_l, theirs_l in zip(trace.attentions, theirs):
        assert ours_l.shape == theirs_l.shape == (1, 4, PROMPT.shape[1], PROMPT.shape[1])
        assert (ours_l - theirs_l).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def hf_greedy(hf_model) -> list[int]:
    """transformers' greedy ``generate``: 20 new tokens."""
    # An explicit attention mask: with a pad_token_id, transformers would mask that id in the prompt.
    out = hf_model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), do_sample=False, max_new_tokens=20)
    tokens = out[0, PROMPT.shape[1] :].tolist()
    assert len(tokens) == 20 and len(set(tokens)) > 3  # not a single repeated token
    return tokens


def test_plain_greedy_loop_matches_transformers_generate(loaded, hf_greedy):
    ids = PROMPT
    with torch.no_grad():
        for _ in range(20):  # the source's uncached loop
            logits = loaded(ids)[:, -1]
            assert_clear_top1(logits)  # no near-tie that another kernel could flip
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert ids[0, PROMPT.shape[1] :].tolist() == hf_greedy


def test_generate_greedy_matches_transformers_generate(loaded, hf_greedy):
    out = generation.generate_greedy(loaded, PROMPT, max_new_tokens=20, context_size=N_POSITIONS)
    assert out[0, PROMPT.shape[1] :].tolist() == hf_greedy


# --------------------------------------------------------------------------- the loaded module


def test_loaded_model_is_real_tied_eval_and_has_the_checkpoint_config(hf_dir):
    model = load_pretrained(hf_dir, device="cpu")
    assert not model.training
    shape = dict(vocab_size=VOCAB, context_length=N_POSITIONS, emb_dim=64, n_heads=4, n_layers=N_LAYER)
    assert model.cfg == PRESETS["gpt2"].replace(**shape)  # qkv_bias, tied head, drop_rate 0.1
    assert model.out_head.weight is model.tok_emb.weight
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and not any(t.is_meta for t in tensors)
    fresh = GPTModel(model.cfg)
    for ours, ref in zip(model.trf_blocks, fresh.trf_blocks):
        assert torch.equal(ours.att.mask, ref.att.mask)
    assert model.trf_blocks[0].att.mask.data_ptr() != model.trf_blocks[1].att.mask.data_ptr()


def test_dtype_is_converted_and_logits_stay_close(hf_dir, hf_model):
    model = load_pretrained(hf_dir, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        diff = (model(PROMPT).float() - hf_model(PROMPT).logits).abs().max()
    assert 0 < diff < 0.1 * hf_model(PROMPT).logits.abs().max()


def test_a_safetensors_file_with_config_beside_it(hf_dir, tmp_path, hf_model):
    _write(tmp_path, _state(hf_dir), hf_dir, name="tiny-gpt2.safetensors")
    model = load_pretrained(str(tmp_path / "tiny-gpt2.safetensors"), device="cpu")
    with torch.no_grad():
        assert (model(PROMPT) - hf_model(PROMPT).logits).abs().max() <= 1e-4


# --------------------------------------------------------------------------- refused checkpoints


@pytest.mark.parametrize("drop", ["transformer.h.1.mlp.c_fc.bias", "transformer.wpe.weight", "transformer.ln_f.bias"])
def test_missing_tensor_is_named(hf_dir, tmp_path, drop):
    state = _state(hf_dir)
    del state[drop]
    with pytest.raises(CheckpointError, match=rf"missing tensor\(s\): {drop.removeprefix('transformer.')}"):
        load_pretrained(_write(tmp_path, state, hf_dir), device="cpu")


def test_unexpected_tensor_is_named(hf_dir, tmp_path):
    state = _state(hf_dir) | {"transformer.h.0.attn.rotary": torch.zeros(3), "h.2.ln_1.weight": torch.ones(64)}
    named = r"unexpected tensor\(s\): h\.2\.ln_1\.weight, transformer\.h\.0\.attn\.rotary"
    with pytest.raises(CheckpointError, match=named):
        load_pretrained(_write(tmp_path, state, hf_dir), device="cpu")


def test_wrong_shape_names_both_shapes(hf_dir, tmp_path):
    state = _state(hf_dir)
    state["transformer.h.0.attn.c_attn.weight"] = state["transformer.h.0.attn.c_attn.weight"].t()
    both_shapes = r"h\.0\.attn\.c_attn\.weight has shape \(192, 64\), expected \(64, 192\)"
    with pytest.raises(CheckpointError, match=both_shapes):
        load_pretrained(_write(tmp_path, state, hf_dir), device="cpu")


def test_config_that_disagrees_with_the_tensors_is_refused(hf_dir, tmp_path):
    _write(tmp_path, _state(hf_dir), hf_dir)
    hf = json.loads((tmp_path / "config.json").read_text()) | {"n_layer": 3}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): h\.2\.ln_1\.weight"):
        load_pretrained(tmp_path, device="cpu")


def test_untied_lm_head_is_refused(hf_dir, tmp_path):
    state = _state(hf_dir) | {"lm_head.weight": torch.randn(VOCAB, 64)}
    with pytest.raises(CheckpointError, match="lm_head.weight differs from wte.weight"):
        load_pretrained(_write(tmp_path, state, hf_dir), device="cpu")


def test_the_same_tensor_twice_is_refused(hf_dir, tmp_path):
    state = _state(hf_dir)
    state["wte.weight"] = state["transformer.wte.weight"].clone()
    with pytest.raises(CheckpointError, match="duplicated"):
        load_pretrained(_write(tmp_path, state, hf_dir), device="cpu")


def test_corrupt_safetensors_is_refused(hf_dir, tmp_path):
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_pretrained(tmp_path, device="cpu")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_embd": None}, r"emb_dim must be a positive integer, got None \(emb_dim is n_embd"),
        ({"n_head": 5}, "emb_dim must be divisible by n_heads"),
        ({"activation_function": "relu"}, "activation_function='relu'"),
        ({"n_inner": 100}, "n_inner=100"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ],
)
def test_config_that_is_not_gpt2_is_refused(change, message):
    hf = {"n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 64, "vocab_size": VOCAB} | change
    with pytest.raises(CheckpointError, match=message):
        config_from_hf(hf)


def test_config_missing_a_key_is_named():
    with pytest.raises(CheckpointError, match="lacks n_positions"):
        config_from_hf({"n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": VOCAB})


def test_released_gpt2_config_gives_the_gpt2_preset():
    # The fields of openai-community/gpt2's config.json that gptviz reads.
    hf = {"model_type": "gpt2", "activation_function": "gelu_new", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
          "n_layer": 12, "n_positions": 1024, "vocab_size": 50257, "layer_norm_epsilon": 1e-05,
          "attn_pdrop": 0.1, "embd_pdrop": 0.1, "resid_pdrop": 0.1}  # fmt: skip
    assert config_from_hf(hf) == PRESETS["gpt2"]


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.ckpt", "weights.pkl"])
def test_other_pickles_are_refused_without_being_read(tmp_path, monkeypatch, name):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    (tmp_path / name).write_bytes(b"not read")
    with pytest.raises(WeightsError, match="pickled checkpoints are refused"):
        load_pretrained(tmp_path / name, device="cpu")
    with pytest.raises(WeightsError, match=rf"no model.safetensors \(found only pickled {name}"):
        load_pretrained(tmp_path, device="cpu")


def test_a_directory_is_not_searched_for_a_pth(tmp_path, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    (tmp_path / "model.pth").write_bytes(b"not read")
    with pytest.raises(WeightsError, match=r"found only pickled model.pth.*pass a .pth/.pt file itself"):
        load_pretrained(tmp_path, device="cpu")


def test_missing_config_and_missing_path_are_explained(hf_dir, tmp_path):
    shutil.copy(hf_dir / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match="config.json: missing"):
        load_pretrained(tmp_path, device="cpu")
    with pytest.raises(WeightsError, match="neither a released model name"):
        load_pretrained(tmp_path / "nowhere", device="cpu")


# --------------------------------------------------------------------------- names and the Hub


@pytest.fixture
def no_hub(monkeypatch):
    """Fails the test if anything reaches huggingface_hub's download."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"hf_hub_download must not be called: {args}")

    monkeypatch.setattr(weights, "hf_hub_download", refuse)


def test_allowed_names_are_exactly_the_released_models_and_the_books_files():
    assert PRETRAINED_NAMES == ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2",
                                "book:gpt2-small-124M", "book:gpt2-medium-355M", "book:gpt2-large-774M",
                                "book:gpt2-xl-1558M")  # fmt: skip
    assert all(is_allowed_name(n) for n in PRETRAINED_NAMES)
    for other in ["gpt3", "GPT2", "openai-community/gpt2", "distilbert/distilgpt2", "hf:openai-community/gpt2",
                  "book:gpt2-small", "book:gpt2-small-124M.pth", "rasbt/gpt2-from-scratch-pytorch",
                  "./gpt2", "../gpt2", "/etc/passwd", "", None, 2]:  # fmt: skip
        assert not is_allowed_name(other)


@pytest.mark.parametrize("name", ["gpt3", "openai-community/gpt2", "distilbert/distilgpt2", "book:gpt2-small"])
def test_unknown_names_never_reach_the_hub(no_hub, name):
    with pytest.raises(WeightsError, match="neither a released model name.*gpt2, gpt2-medium, gpt2-large, gpt2-xl"):
        load_pretrained(name, device="cpu")


def test_a_path_named_like_a_model_is_a_path(no_hub, hf_dir, tmp_path, monkeypatch):
    shutil.copytree(hf_dir, tmp_path / "gpt2")
    monkeypatch.chdir(tmp_path)
    assert load_pretrained(Path("gpt2"), device="cpu").cfg.vocab_size == VOCAB
    assert load_pretrained("./gpt2", device="cpu").cfg.vocab_size == VOCAB


def test_a_released_name_downloads_config_and_safetensors_from_openai_community(hf_dir, monkeypatch):
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(hf_dir / filename)

    monkeypatch.setattr(weights, "hf_hub_download", fake_download)
    model = load_pretrained("gpt2-medium", device="cpu", progress=False)
    repo = "openai-community/gpt2-medium"
    assert sorted(calls) == [(repo, "config.json"), (repo, "model.safetensors")]
    assert model.cfg.vocab_size == VOCAB  # the config comes from the downloaded config.json


def test_offline_and_not_cached_gives_weights_error(tmp_path, monkeypatch):
    # Offline mode (conftest sets HF_HUB_OFFLINE=1) and an empty cache: the real
    # hf_hub_download raises without touching the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    message = r"could not download gpt2 .*\(offline\?\) — cached copies are used when present"
    with pytest.raises(WeightsError, match=message) as info:
        load_pretrained("gpt2", device="cpu")
    assert isinstance(info.value.__cause__, huggingface_hub.errors.LocalEntryNotFoundError)


def test_network_failure_gives_weights_error(monkeypatch):
    def unreachable(*args, **kwargs):
        raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(weights, "hf_hub_download", unreachable)
    with pytest.raises(WeightsError, match="could not download gpt2-xl .*ConnectError"):
        load_pretrained("gpt2-xl", device="cpu")


# --------------------------------------------------------------------------- memory


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_estimated_bytes_equals_what_the_loaded_model_holds(hf_dir, dtype):
    model = load_pretrained(hf_dir, device="cpu", dtype=dtype)
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert estimated_bytes(model.cfg, dtype) == held


def test_estimated_bytes_of_released_names():
    # SPEC.md's parameter count of gpt2 (tied), 4 bytes each, plus 12 boolean 1024 x 1024 masks.
    assert estimated_bytes("gpt2") == 124_439_808 * 4 + 12 * 1024 * 1024
    assert estimated_bytes("gpt2-xl", torch.bfloat16) == 1_557_611_200 * 2 + 48 * 1024 * 1024


def test_estimated_bytes_refuses_an_unknown_name():
    with pytest.raises(WeightsError, match="unknown model name 'gpt3': choose one of gpt2, gpt2-medium"):
        estimated_bytes("gpt3")


# =========================================================================== readers' own models
#
# The book's chapter-4 GPTModel (tests/book_model.py, written independently of gptviz) saved
# the book's ways, and the book companion's converted GPT-2 files.

BOOK_CTX = 32
#: emb_dim 768: n_heads (12) is inferred from the released GPT-2 of that width.
BOOK_768 = {"vocab_size": VOCAB, "context_length": BOOK_CTX, "emb_dim": 768, "n_heads": 12, "n_layers": 2,
            "drop_rate": 0.1, "qkv_bias": False}  # fmt: skip
#: emb_dim 64: no released GPT-2 is this wide, so n_heads must be given.
BOOK_64 = BOOK_768 | {"emb_dim": 64, "n_heads": 4}
#: Both sides run float32 matmuls over the same weights, but through two separate
#: implementations (the book's modules, gptviz's), and gptviz picks its matmul kernel per CPU by
#: timing (F.linear or oneDNN's, gptviz.kernels), so the sums may run in another order. float32
#: agreement is relative to the size of the numbers: 1e-5 absolute (the issue's bound) plus 1e-5
#: of the value, on logits of std ~1.4 and up to ~6 (768 wide). Seen on a CI CPU: 1.05e-5 at a logit of 4.7.
BOOK_ATOL = 1e-5
BOOK_RTOL = 1e-5


def _redraw(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter drawn anew (biases and shifts non-zero, scales near 1), so a wrongly
    mapped tensor changes the logits; small enough that 768-wide logits stay of order 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = name.endswith((".scale", "ln_1.weight", "ln_2.weight", "ln_f.weight"))
            p.normal_(1.0, 0.1) if scale else p.normal_(0.0, 0.05)
    return model.eval()


def _book(cfg: dict, seed: int = 123) -> book_model.GPTModel:
    torch.manual_seed(seed)
    return _redraw(book_model.GPTModel(cfg))


@pytest.fixture(scope="module")
def book768() -> book_model.GPTModel:
    return _book(BOOK_768)


@pytest.fixture(scope="module")
def book64() -> book_model.GPTModel:
    return _book(BOOK_64)


def _logits(model: torch.nn.Module, ids: torch.Tensor = PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def _book_state(model: book_model.GPTModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_books_state_dict_pth_loads_with_the_books_logits(book768, tmp_path):
    path = tmp_path / "model.pth"
    torch.save(book768.state_dict(), path)  # the book's chapter-5 way
    saved = torch.load(path, weights_only=True)
    assert saved["trf_blocks.1.att.mask"].dtype == torch.float32  # the book's buffer is in the file
    model = load_pretrained(path, device="cpu")
    assert model.cfg == GPTConfig(vocab_size=VOCAB, context_length=BOOK_CTX, emb_dim=768, n_heads=12, n_layers=2,
                                  drop_rate=0.1, qkv_bias=False, tie_weights=False)  # fmt: skip
    assert not model.training and model.out_head.weight is not model.tok_emb.weight
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    theirs = _logits(book768)
    assert theirs.std() > 0.1  # far from a flat output
    torch.testing.assert_close(_logits(model), theirs, atol=BOOK_ATOL, rtol=BOOK_RTOL)
    assert model.weights_source == WeightsSource(kind="file", name="model.pth", filename="model.pth",
                                                 sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                                                 config=model.cfg)  # fmt: skip


def test_a_model_and_optimizer_checkpoint_loads_and_asks_for_n_heads(book64, tmp_path):
    model = _book(BOOK_64, seed=7).train()
    before = model.out_head.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    loss = F.cross_entropy(model(PROMPT[:, :-1]).flatten(0, 1), PROMPT[0, 1:])
    loss.backward()
    optimizer.step()
    model.eval()
    assert not torch.equal(before, model.out_head.weight)  # the step changed the weights
    path = tmp_path / "model_and_optimizer.pth"
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()}, path)
    assert len(torch.load(path, weights_only=True)["optimizer_state_dict"]["state"]) > 0  # AdamW's moments are in it

    with pytest.raises(NeedsHeadsError, match=r"n_heads cannot be read.*emb_dim=64.*n_heads=") as info:
        load_pretrained(path, device="cpu")
    assert info.value.emb_dim == 64 and isinstance(info.value, CheckpointError)
    loaded = load_pretrained(path, device="cpu", n_heads=4)
    assert loaded.cfg.n_heads == 4 and loaded.cfg.emb_dim == 64
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=BOOK_ATOL, rtol=BOOK_RTOL)


def test_n_heads_that_does_not_divide_emb_dim_is_refused(book64, tmp_path):
    torch.save(book64.state_dict(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"emb_dim must be divisible by n_heads.*\(n_heads=5\)"):
        load_pretrained(tmp_path / "m.pt", device="cpu", n_heads=5)


def test_gptvizs_own_tied_state_dict_loads_tied(tmp_path):
    cfg = PRESETS["gpt2"].replace(vocab_size=VOCAB, context_length=BOOK_CTX, n_layers=1)
    torch.manual_seed(0)
    ours = _redraw(GPTModel(cfg))
    torch.save(ours.state_dict(), tmp_path / "ours.pth")  # out_head.weight is tok_emb.weight, no masks
    loaded = load_pretrained(tmp_path / "ours.pth", device="cpu")
    assert loaded.cfg == cfg and loaded.out_head.weight is loaded.tok_emb.weight
    assert torch.equal(_logits(loaded), _logits(ours))  # the same module code on bitwise equal weights


def test_config_from_state_dict_reads_bias_and_tying(book64):
    state = _book_state(book64)
    assert config_from_state_dict(state, n_heads=4) == GPTConfig(**BOOK_64)
    with_bias = _book_state(_book(BOOK_64 | {"qkv_bias": True}))
    assert config_from_state_dict(with_bias, n_heads=4).qkv_bias is True
    assert config_from_state_dict(state | {"out_head.weight": state["tok_emb.weight"].clone()}, 4).tie_weights
    assert config_from_state_dict({k: v for k, v in state.items() if k != "out_head.weight"}, 4).tie_weights
    hf_named = {"transformer.wte.weight": torch.zeros(VOCAB, 64)}
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): tok_emb.weight.*Hugging Face GPT-2 names"):
        config_from_state_dict(hf_named)
    compiled = {f"_orig_mod.{k}": v for k, v in state.items()}  # a torch.compile'd model's state_dict
    with pytest.raises(CheckpointError, match=r"tok_emb.weight.*carry a prefix '_orig_mod.'"):
        config_from_state_dict(compiled)


# --------------------------------------------------------------------------- pickles that ask for more


def _payloads(marker: Path) -> dict[str, object]:
    class System:
        def __reduce__(self):
            return os.system, (f"touch {shlex.quote(str(marker))}",)

    class Touch:
        def __reduce__(self):
            return pathlib.Path.touch, (marker,)

    return {"os.system": System(), "Path.touch": Touch()}


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
@pytest.mark.parametrize("payload", ["os.system", "Path.touch"])
@pytest.mark.parametrize("loader", ["load_pretrained", "load_upload"])
def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, writer, payload, loader):
    marker = tmp_path / "payload-ran"
    content = {"tok_emb.weight": torch.zeros(4, 8), "x": _payloads(marker)[payload]}
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save(content, path)
    else:
        path.write_bytes(pickle.dumps(content))
    load = load_pretrained if loader == "load_pretrained" else load_upload
    with pytest.raises(CheckpointError, match=r"refused: the file holds more than tensors.*it was not run") as info:
        load(path, device="cpu")
    assert not marker.exists()  # nothing of the file ran
    assert "weights_only" not in str(info.value)  # no advice to unpickle it in full
    # The payload is live: a full unpickle (done here only, on our own file) runs it.
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_a_whole_pickled_model_and_other_contents_are_explained(book64, tmp_path):
    torch.save(book64, tmp_path / "whole.pth")  # the whole module, not its state_dict
    with pytest.raises(CheckpointError, match="more than tensors.*GPTModel.*torch.save\\(model.state_dict\\(\\)"):
        load_pretrained(tmp_path / "whole.pth", device="cpu")
    torch.save({"epoch": 3, "model": book64.state_dict()}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"is not a state dict: 'epoch', 'model' hold\(s\) no tensor"):
        load_pretrained(tmp_path / "other.pth", device="cpu")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_pretrained(tmp_path / "list.pth", device="cpu")
    torch.save(book64.state_dict(), tmp_path / "whole-file.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "whole-file.pth").read_bytes()[:5000])  # a broken download
    with pytest.raises(CheckpointError, match="cut.pth: not a readable PyTorch checkpoint"):
        load_pretrained(tmp_path / "cut.pth", device="cpu")


# --------------------------------------------------------------------------- book state dicts that do not fit


def _edited(state: dict, edit) -> dict:
    state = dict(state)
    edit(state)
    return state


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("trf_blocks.1.ff.layers.0.bias"), r"missing tensor\(s\): trf_blocks\.1\.ff\.layers\.0\.bias$"),
        (lambda s: s.pop("final_norm.shift"), r"missing tensor\(s\): final_norm\.shift$"),
        (lambda s: s.pop("tok_emb.weight"), r"missing tensor\(s\): tok_emb\.weight"),
        (lambda s: s.update({"trf_blocks.0.ff.layers.2.weight": s["trf_blocks.0.ff.layers.2.weight"].t()}),
         r"trf_blocks\.0\.ff\.layers\.2\.weight has shape \(256, 64\), expected \(64, 256\)"),
        (lambda s: s.update({"trf_blocks.1.norm2.scale": torch.ones(65)}),
         r"trf_blocks\.1\.norm2\.scale has shape \(65,\), expected \(64,\)"),
        (lambda s: s.update({"trf_blocks.0.att.rotary": torch.zeros(3), "lm_head.weight": torch.zeros(VOCAB, 64)}),
         r"unexpected tensor\(s\): lm_head\.weight, trf_blocks\.0\.att\.rotary$"),
        (lambda s: s.update({"trf_blocks.0.att.W_query.bias": torch.zeros(64)}),  # qkv_bias read from this one
         r"missing tensor\(s\): trf_blocks\.0\.att\.W_key\.bias, trf_blocks\.0\.att\.W_value\.bias, "
         r"trf_blocks\.1\.att\.W_query\.bias"),
    ],
    ids=["missing-bias", "missing-shift", "missing-tok_emb", "transposed", "reshaped", "unexpected", "half-biased"],
)
def test_a_state_dict_that_does_not_fit_is_refused_naming_the_tensors(book64, tmp_path, edit, message):
    torch.save(_edited(_book_state(book64), edit), tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=message) as info:
        load_pretrained(tmp_path / "bad.pth", device="cpu", n_heads=4)
    assert str(info.value).startswith(str(tmp_path / "bad.pth"))  # the operator sees which file


def _causal(n: int) -> torch.Tensor:  # the book's own expression
    return torch.triu(torch.ones(n, n), diagonal=1)


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.tril(torch.ones(BOOK_CTX, BOOK_CTX), diagonal=-1), r"trf_blocks\.1\.att\.mask is not the causal mask"),
        (_causal(BOOK_CTX).index_put_((torch.tensor(0), torch.tensor(1)), torch.tensor(0.0)), "is not the causal mask"),
        (_causal(BOOK_CTX) * 0.5, "is not the causal mask"),
        (torch.ones(BOOK_CTX, BOOK_CTX), "is not the causal mask"),
        (_causal(BOOK_CTX + 1), r"trf_blocks\.1\.att\.mask has shape \(33, 33\), expected \(32, 32\)"),
        (_causal(BOOK_CTX).long(), "trf_blocks.1.att.mask has dtype int64, expected a float or bool causal mask"),
    ],
    ids=["lower", "one-entry", "halves", "all-ones", "too-large", "integer"],
)
def test_a_wrong_mask_buffer_is_refused(book64, tmp_path, mask, message):
    torch.save(_book_state(book64) | {"trf_blocks.1.att.mask": mask}, tmp_path / "bad-mask.pth")
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(tmp_path / "bad-mask.pth", device="cpu", n_heads=4)


@pytest.mark.parametrize("masks", ["bool", "half", "absent"])
def test_right_masks_in_any_form_are_accepted(book64, tmp_path, masks):
    state = _book_state(book64)
    for i in range(BOOK_64["n_layers"]):
        key = f"trf_blocks.{i}.att.mask"
        if masks == "absent":
            del state[key]
        else:
            state[key] = state[key].to(torch.bool if masks == "bool" else torch.float16)
    torch.save(state, tmp_path / "ok.pth")
    loaded = load_pretrained(tmp_path / "ok.pth", device="cpu", n_heads=4)
    torch.testing.assert_close(_logits(loaded), _logits(book64), atol=BOOK_ATOL, rtol=BOOK_RTOL)


# --------------------------------------------------------------------------- the book's converted GPT-2 files


def _hf_to_book(hf_state: dict[str, torch.Tensor], cfg: dict) -> book_model.GPTModel:
    """The book companion's conversion (chapter 5's ``load_weights_into_gpt``, reading the
    Hugging Face tensors): numpy splits of the fused c_attn, transposes of Conv1D weights,
    and ``out_head`` a copy of ``wte``. Independent of gptviz.files.weights."""
    params = {k.removeprefix("transformer."): v.numpy() for k, v in hf_state.items()}
    gpt = book_model.GPTModel(cfg)

    def assign(left, right):
        if left.shape != right.shape:
            raise ValueError(f"Shape mismatch. Left: {left.shape}, Right: {right.shape}")
        return torch.nn.Parameter(torch.tensor(right))

    gpt.pos_emb.weight = assign(gpt.pos_emb.weight, params["wpe.weight"])
    gpt.tok_emb.weight = assign(gpt.tok_emb.weight, params["wte.weight"])
    for b in range(cfg["n_layers"]):
        h, blk = f"h.{b}.", gpt.trf_blocks[b]
        q_w, k_w, v_w = np.split(params[h + "attn.c_attn.weight"], 3, axis=-1)
        blk.att.W_query.weight = assign(blk.att.W_query.weight, q_w.T)
        blk.att.W_key.weight = assign(blk.att.W_key.weight, k_w.T)
        blk.att.W_value.weight = assign(blk.att.W_value.weight, v_w.T)
        q_b, k_b, v_b = np.split(params[h + "attn.c_attn.bias"], 3, axis=-1)
        blk.att.W_query.bias = assign(blk.att.W_query.bias, q_b)
        blk.att.W_key.bias = assign(blk.att.W_key.bias, k_b)
        blk.att.W_value.bias = assign(blk.att.W_value.bias, v_b)
        blk.att.out_proj.weight = assign(blk.att.out_proj.weight, params[h + "attn.c_proj.weight"].T)
        blk.att.out_proj.bias = assign(blk.att.out_proj.bias, params[h + "attn.c_proj.bias"])
        blk.ff.layers[0].weight = assign(blk.ff.layers[0].weight, params[h + "mlp.c_fc.weight"].T)
        blk.ff.layers[0].bias = assign(blk.ff.layers[0].bias, params[h + "mlp.c_fc.bias"])
        blk.ff.layers[2].weight = assign(blk.ff.layers[2].weight, params[h + "mlp.c_proj.weight"].T)
        blk.ff.layers[2].bias = assign(blk.ff.layers[2].bias, params[h + "mlp.c_proj.bias"])
        blk.norm1.scale = assign(blk.norm1.scale, params[h + "ln_1.weight"])
        blk.norm1.shift = assign(blk.norm1.shift, params[h + "ln_1.bias"])
        blk.norm2.scale = assign(blk.norm2.scale, params[h + "ln_2.weight"])
        blk.norm2.shift = assign(blk.norm2.shift, params[h + "ln_2.bias"])
    gpt.final_norm.scale = assign(gpt.final_norm.scale, params["ln_f.weight"])
    gpt.final_norm.shift = assign(gpt.final_norm.shift, params["ln_f.bias"])
    gpt.out_head.weight = assign(gpt.out_head.weight, params["wte.weight"])
    return gpt.eval()


HF_COMMIT, BOOK_COMMIT = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    """A tiny 768-wide GPT-2 (n_heads inferable) as a Hub snapshot in Hugging Face layout, and the
    same weights converted to the book's gpt2-small-124M.pth, each under huggingface_hub's cache
    layout ``…/snapshots/<commit>/<file>``."""
    cfg = GPT2Config(n_embd=768, n_head=12, n_layer=2, n_positions=BOOK_CTX, vocab_size=VOCAB,
                     bos_token_id=None, eos_token_id=None, attn_implementation="eager")  # fmt: skip
    torch.manual_seed(321)
    hf = _redraw(GPT2LMHeadModel(cfg))
    root = tmp_path_factory.mktemp("hub")
    hf_snap = root / "models--openai-community--gpt2" / "snapshots" / HF_COMMIT
    book_snap = root / "models--rasbt--gpt2-from-scratch-pytorch" / "snapshots" / BOOK_COMMIT
    hf_snap.mkdir(parents=True), book_snap.mkdir(parents=True)
    hf.save_pretrained(hf_snap, safe_serialization=True)
    book = _hf_to_book(_state(hf_snap), BOOK_768 | {"qkv_bias": True})
    torch.save(book.state_dict(), book_snap / "gpt2-small-124M.pth")
    return {"hf": hf, "book": book, "openai-community/gpt2": hf_snap, "rasbt/gpt2-from-scratch-pytorch": book_snap}


@pytest.fixture
def served(fake_hub, monkeypatch):
    """``hf_hub_download`` answered from :func:`fake_hub`; returns the calls made."""
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs.get("revision")))
        if repo_id not in fake_hub:
            raise huggingface_hub.errors.RepositoryNotFoundError(f"no {repo_id} here")
        return str(fake_hub[repo_id] / filename)

    monkeypatch.setattr(weights, "hf_hub_download", fake_download)
    return calls


def test_the_books_converted_file_and_the_released_file_give_the_same_model(fake_hub, served):
    from_hf = load_pretrained("gpt2", device="cpu", progress=False)
    from_book = load_pretrained("book:gpt2-small-124M", device="cpu", progress=False)
    assert served == [("openai-community/gpt2", "config.json", None),
                      ("openai-community/gpt2", "model.safetensors", None),
                      ("rasbt/gpt2-from-scratch-pytorch", "gpt2-small-124M.pth", None)]  # fmt: skip
    expected = PRESETS["gpt2"].replace(vocab_size=VOCAB, context_length=BOOK_CTX, n_layers=2)
    assert from_hf.cfg == from_book.cfg == expected  # qkv_bias, tied, 12 heads inferred from 768
    assert from_book.out_head.weight is from_book.tok_emb.weight
    ours, theirs = from_book.state_dict(), from_hf.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:  # the same float32 numbers moved by two conversions, no arithmetic: exactly equal
        assert torch.equal(ours[key], theirs[key]), key
    logits = _logits(from_book)
    assert torch.equal(logits, _logits(from_hf))  # bitwise equal weights through the same module code
    with book_kernels():  # F.linear on both sides: only the two loading paths differ
        book_path = _logits(from_book)
    torch.testing.assert_close(book_path, _logits(fake_hub["book"]), atol=BOOK_ATOL, rtol=BOOK_RTOL)
    # gptviz's own CPU kernel (oneDNN, gptviz.kernels.linear) sums in another order: float32
    # rounding of logits up to ~3 over 2 blocks of width 768 (1.1e-5 seen on oneDNN's AVX2 path)
    torch.testing.assert_close(logits, book_path, atol=1e-5, rtol=1e-5)
    # transformers' kernels differ (fused c_attn, its own GELU): 1e-4, as the tests above
    torch.testing.assert_close(logits, fake_hub["hf"](PROMPT).logits.detach(), atol=1e-4, rtol=0)

    assert from_hf.weights_source == WeightsSource(kind="hub", name="gpt2", repo_id="openai-community/gpt2",
                                                   revision=HF_COMMIT, filename="model.safetensors",
                                                   config=expected)  # fmt: skip
    assert from_book.weights_source == WeightsSource(kind="book", name="book:gpt2-small-124M",
                                                     repo_id="rasbt/gpt2-from-scratch-pytorch", revision=BOOK_COMMIT,
                                                     filename="gpt2-small-124M.pth", config=expected)  # fmt: skip
    assert weights.weights_source(from_book) is from_book.weights_source


def test_book_names_map_to_the_companions_files(served):
    for size in ["medium-355M", "large-774M", "xl-1558M"]:
        name, filename = f"book:gpt2-{size}", f"gpt2-{size}.pth"
        with pytest.raises(WeightsError):  # the fake cache holds only the small one
            load_pretrained(name, device="cpu", progress=False)
        assert served[-1] == ("rasbt/gpt2-from-scratch-pytorch", filename, None)
        assert hub_repo_id(name) == "rasbt/gpt2-from-scratch-pytorch"


def test_distilgpt2_comes_from_distilbert_and_its_size_is_known(served):
    assert hub_repo_id("distilgpt2") == "distilbert/distilgpt2"
    assert pretrained_config("distilgpt2") == PRESETS["gpt2"].replace(n_layers=6)
    # SPEC.md: gpt2 (tied) 124,439,808; a block with q/k/v biases 7,085,568 + 3 * 768: six fewer blocks
    assert estimated_bytes("distilgpt2") == (124_439_808 - 6 * (7_085_568 + 3 * 768)) * 4 + 6 * 1024 * 1024
    with pytest.raises(WeightsError, match=r"could not download distilgpt2 \(distilbert/distilgpt2\)"):
        load_pretrained("distilgpt2", device="cpu", progress=False)
    assert served == [("distilbert/distilgpt2", "config.json", None)]


def test_book_names_are_sized_as_the_released_models():
    # SPEC.md's tied parameter counts; one boolean 1024 x 1024 mask per block
    assert estimated_bytes("book:gpt2-small-124M") == 124_439_808 * 4 + 12 * 1024 * 1024
    assert estimated_bytes("book:gpt2-medium-355M", torch.bfloat16) == 354_823_168 * 2 + 24 * 1024 * 1024
    assert pretrained_config("book:gpt2-xl-1558M") == PRESETS["gpt2-xl"]


# --------------------------------------------------------------------------- operators' Hub repositories


def test_an_operators_hub_repo_needs_the_hf_prefix(fake_hub, served, tmp_path, monkeypatch):
    fake_hub["someone/tiny-gpt2"] = fake_hub["openai-community/gpt2"]
    model = load_pretrained("hf:someone/tiny-gpt2@v1.0", device="cpu", progress=False)
    assert served == [("someone/tiny-gpt2", "config.json", "v1.0"), ("someone/tiny-gpt2", "model.safetensors", "v1.0")]
    assert model.weights_source == WeightsSource(kind="hub", name="hf:someone/tiny-gpt2@v1.0",
                                                 repo_id="someone/tiny-gpt2", revision=HF_COMMIT,
                                                 filename="model.safetensors", config=model.cfg)  # fmt: skip
    monkeypatch.chdir(tmp_path)
    served.clear()
    with pytest.raises(WeightsError, match=r"neither a released model name.*nor an existing path.*hf:owner/name"):
        load_pretrained("someone/tiny-gpt2", device="cpu")  # without the prefix: a path
    assert served == []


@pytest.mark.parametrize("spec", ["hf:../../etc", "hf:a/b/c", "hf:owner", "hf:/abs/x", "hf:a/b@../x", "hf:a/b@",
                                  "hf:a/b@x y", "hf:", "hf:a/.."])
def test_a_malformed_hub_repo_is_refused_before_the_hub(no_hub, spec):
    with pytest.raises(WeightsError, match="not a Hugging Face Hub repository id|is not a revision"):
        load_pretrained(spec, device="cpu")


def test_a_local_path_that_starts_with_hf_stays_a_path(no_hub, hf_dir, tmp_path, monkeypatch):
    shutil.copytree(hf_dir, tmp_path / "hf:local")
    monkeypatch.chdir(tmp_path)
    assert load_pretrained("hf:local", device="cpu").weights_source.kind == "file"


def test_n_heads_must_agree_with_config_json(hf_dir):
    with pytest.raises(CheckpointError, match="n_head=4, but n_heads=8 was given"):
        load_pretrained(hf_dir, device="cpu", n_heads=8)
    assert load_pretrained(hf_dir, device="cpu", n_heads=4).cfg.n_heads == 4


def test_a_local_directory_names_its_file_and_hash(hf_dir):
    model = load_pretrained(hf_dir, device="cpu")
    source = model.weights_source
    assert (source.kind, source.name, source.filename) == ("file", hf_dir.name, "model.safetensors")
    assert source.sha256 == hashlib.sha256((hf_dir / "model.safetensors").read_bytes()).hexdigest()
    assert source.sha256_prefix == source.sha256[:12] and source.config == model.cfg
    assert str(hf_dir.parent) not in repr(source)  # no server folder in what a card may show


def test_random_weights_have_a_source_too():
    source = WeightsSource.random(PRESETS["seed-124M"])
    assert (source.kind, source.seed, source.config, source.sha256) == ("random", 123, PRESETS["seed-124M"], None)


# --------------------------------------------------------------------------- lone safetensors files


def test_a_lone_safetensors_file_infers_its_configuration(hf_dir, hf_model, tmp_path):
    shutil.copy(hf_dir / "model.safetensors", tmp_path / "tiny.safetensors")  # no config.json beside it
    with pytest.raises(NeedsHeadsError, match="n_heads"):
        load_pretrained(tmp_path / "tiny.safetensors", device="cpu")
    model = load_pretrained(tmp_path / "tiny.safetensors", device="cpu", n_heads=4)
    assert model.cfg == load_pretrained(hf_dir, device="cpu").cfg  # the same as its config.json says
    # transformers' kernels differ (fused c_attn): 1e-4, as the tests above
    torch.testing.assert_close(_logits(model), hf_model(PROMPT).logits.detach(), atol=1e-4, rtol=0)


def test_a_book_named_safetensors_file_loads(book64, tmp_path):
    state = {k: v for k, v in _book_state(book64).items() if not k.endswith(".mask")}
    save_file(state, tmp_path / "book.safetensors")
    loaded = load_pretrained(tmp_path / "book.safetensors", device="cpu", n_heads=4)
    torch.testing.assert_close(_logits(loaded), _logits(book64), atol=BOOK_ATOL, rtol=BOOK_RTOL)


# --------------------------------------------------------------------------- uploads


def test_an_upload_over_the_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("an oversized upload was read")

    monkeypatch.setattr(torch, "load", never)
    monkeypatch.setattr(checkpoints, "safe_open", never)  # where uploads are read
    for name in ("big.pth", "big.safetensors"):
        (tmp_path / name).write_bytes(b"\x00" * 2000)
        too_large = r"big\.\w+: 2,000 bytes .* over the upload limit of 1,000 bytes"
        with pytest.raises(TooLargeError, match=too_large) as info:
            load_upload(tmp_path / name, device="cpu", max_bytes=1000)
        assert str(tmp_path) not in str(info.value)  # a visitor never sees the server's folders


def test_an_uploaded_safetensors_file_ignores_what_lies_beside_it(hf_dir, hf_model, tmp_path):
    up = tmp_path / "upload"
    up.mkdir()
    shutil.copy(hf_dir / "model.safetensors", up / "mine.safetensors")
    (up / "config.json").write_text(json.dumps({"n_embd": 1, "n_head": 1, "n_layer": 99}))  # would fail if read
    with pytest.raises(NeedsHeadsError, match="n_heads") as info:
        load_upload(up / "mine.safetensors", device="cpu")
    assert str(up) not in str(info.value)
    model = load_upload(up / "mine.safetensors", n_heads=4, device="cpu")
    # transformers' kernels differ (fused c_attn): 1e-4, as the tests above
    torch.testing.assert_close(_logits(model), hf_model(PROMPT).logits.detach(), atol=1e-4, rtol=0)
    digest = hashlib.sha256((up / "mine.safetensors").read_bytes()).hexdigest()
    assert model.weights_source == WeightsSource(kind="file", name="mine.safetensors", filename="mine.safetensors",
                                                 sha256=digest, config=model.cfg)  # fmt: skip


def test_an_uploaded_pth_loads(book768, tmp_path):
    torch.save({"model_state_dict": book768.state_dict()}, tmp_path / "trained.pt")
    model = load_upload(tmp_path / "trained.pt", device="cpu", dtype=torch.float32)
    assert model.cfg.n_heads == 12
    torch.testing.assert_close(_logits(model), _logits(book768), atol=BOOK_ATOL, rtol=BOOK_RTOL)


def test_an_upload_whose_model_would_be_too_large_is_refused_before_it_is_built(tmp_path):
    # A small file can describe a large model: 2 blocks of 4096 x 4096 causal masks (33.5 MB) from a
    # position embedding of 4096 x 8 floats. The memory limit is checked before anything is built.
    cfg = {"vocab_size": 10, "context_length": 4096, "emb_dim": 8, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0,
           "qkv_bias": False}  # fmt: skip
    torch.manual_seed(0)
    state = {k: v for k, v in book_model.GPTModel(cfg).state_dict().items() if not k.endswith(".mask")}
    torch.save(state, tmp_path / "long.pth")
    assert (tmp_path / "long.pth").stat().st_size < 300_000
    need = estimated_bytes(GPTConfig(**cfg))
    assert need > 2 * 4096**2
    too_large = rf"long\.pth: the model needs {need:,} bytes .* over the limit of 1,000,000"
    with pytest.raises(TooLargeError, match=too_large):
        load_upload(tmp_path / "long.pth", n_heads=2, device="cpu", max_model_bytes=1_000_000)
    assert load_upload(tmp_path / "long.pth", n_heads=2, device="cpu", max_model_bytes=None).cfg.context_length == 4096


@pytest.mark.parametrize("name, message", [("model.bin", r"\.bin pickles are refused"),
                                           ("weights.ckpt", r"\.ckpt pickles are refused"),
                                           ("notes.txt", "upload a .safetensors, .pth or .pt file")])
def test_other_uploads_are_refused_unread(tmp_path, monkeypatch, name, message):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    (tmp_path / name).write_bytes(b"not read")
    with pytest.raises(WeightsError, match=message):
        load_upload(tmp_path / name, device="cpu")


def test_an_upload_must_be_one_regular_file(book64, tmp_path):
    torch.save(book64.state_dict(), tmp_path / "real.pth")
    (tmp_path / "link.pth").symlink_to(tmp_path / "real.pth")
    (tmp_path / "dir.pth").mkdir()
    for name in ("link.pth", "dir.pth"):
        with pytest.raises(WeightsError, match=rf"{name}: not a regular file"):
            load_upload(tmp_path / name, device="cpu", n_heads=4)
    with pytest.raises(WeightsError, match="gone.pth: cannot read the uploaded file"):
        load_upload(tmp_path / "gone.pth", device="cpu")
    for name, cut in [("cut.pth", (tmp_path / "real.pth").read_bytes()[:5000]), ("cut.safetensors", b"\x10" + b"\x00" * 7)]:
        (tmp_path / name).write_bytes(cut)
        with pytest.raises(CheckpointError, match=rf"{name}: not a readable") as info:
            load_upload(tmp_path / name, device="cpu", n_heads=4)
        assert str(tmp_path) not in str(info.value)
