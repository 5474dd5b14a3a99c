"""Loading GPT-2 checkpoints: small ones built with transformers, in both file layouts,
compared with transformers' own GPT2LMHeadModel. No test touches the network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from gptviz import GPTModel, PRESETS, Trace
from gptviz import generation, weights
from gptviz.weights import (
    PRETRAINED_NAMES,
    CheckpointError,
    WeightsError,
    config_from_hf,
    estimated_bytes,
    is_allowed_name,
    load_pretrained,
)

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


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth"])
def test_pickled_checkpoints_are_refused_without_being_read(tmp_path, monkeypatch, name):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    (tmp_path / name).write_bytes(b"not read")
    with pytest.raises(WeightsError, match="pickled checkpoints are refused"):
        load_pretrained(tmp_path / name, device="cpu")
    with pytest.raises(WeightsError, match=rf"no model.safetensors \(found only pickled {name}"):
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


def test_allowed_names_are_exactly_the_released_models():
    assert PRETRAINED_NAMES == ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
    assert all(is_allowed_name(n) for n in PRETRAINED_NAMES)
    for other in ["gpt3", "GPT2", "openai-community/gpt2", "./gpt2", "../gpt2", "/etc/passwd", "", None, 2]:
        assert not is_allowed_name(other)


@pytest.mark.parametrize("name", ["gpt3", "openai-community/gpt2", "distilgpt2"])
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
