import math

import pytest
import torch
import torch.nn.functional as F

from gptviz import PRESETS, GPTConfig, GPTModel, KVCache, Trace, select_device
from gptviz.model import GELU, LayerNorm

from .test_config import GPT_CONFIG_124M

pytestmark = pytest.mark.numeric  # .ci/run runs this file again on another CPU code path


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_seed_124M_has_the_sources_parameter_count():
    torch.manual_seed(123)
    model = GPTModel(GPT_CONFIG_124M)  # the source's plain dict works too
    assert n_params(model) == 163_009_536
    assert model.out_head.weight is not model.tok_emb.weight
    # The book's tied figure: total minus the output head.
    assert n_params(model) - model.out_head.weight.numel() == 124_412_160


@pytest.mark.parametrize(
    "name, total", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)]
)
def test_gpt2_presets_parameter_counts(name, total):
    with torch.device("meta"):
        model = GPTModel(PRESETS[name])
    assert n_params(model) == total
    assert model.out_head.weight is model.tok_emb.weight  # one shared Parameter


def test_state_dict_uses_the_sources_names(tiny_model):
    keys = set(tiny_model.state_dict())
    for k in [
        "tok_emb.weight",
        "pos_emb.weight",
        "trf_blocks.0.att.W_query.weight",
        "trf_blocks.0.att.W_key.weight",
        "trf_blocks.0.att.W_value.weight",
        "trf_blocks.0.att.out_proj.weight",
        "trf_blocks.0.att.out_proj.bias",
        "trf_blocks.0.ff.layers.0.weight",
        "trf_blocks.0.ff.layers.2.bias",
        "trf_blocks.0.norm1.scale",
        "trf_blocks.1.norm2.shift",
        "final_norm.scale",
        "final_norm.shift",
        "out_head.weight",
    ]:
        assert k in keys, k
    assert "trf_blocks.0.att.W_query.bias" not in keys  # qkv_bias=False
    assert "out_head.bias" not in keys


def reference_logits(model: GPTModel, idx: torch.Tensor) -> torch.Tensor:
    """An independent, straightforward implementation of SPEC.md's architecture,
    written with torch.nn.functional on the model's raw weights."""
    cfg = model.cfg
    sd = model.state_dict()
    T = idx.shape[1]
    x = sd["tok_emb.weight"][idx] + sd["pos_emb.weight"][:T]
    for i in range(cfg.n_layers):
        p = lambda name: sd[f"trf_blocks.{i}.{name}"]  # noqa: E731
        h = F.layer_norm(x, (cfg.emb_dim,), p("norm1.scale"), p("norm1.shift"), eps=1e-5)
        qkv = [
            F.linear(h, p(f"att.{w}.weight"), sd.get(f"trf_blocks.{i}.att.{w}.bias"))
            for w in ("W_query", "W_key", "W_value")
        ]
        q, k, v = (t.unflatten(-1, (cfg.n_heads, cfg.head_dim)).transpose(1, 2) for t in qkv)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = a.transpose(1, 2).flatten(-2)
        x = x + F.linear(a, p("att.out_proj.weight"), p("att.out_proj.bias"))
        h = F.layer_norm(x, (cfg.emb_dim,), p("norm2.scale"), p("norm2.shift"), eps=1e-5)
        h = F.gelu(F.linear(h, p("ff.layers.0.weight"), p("ff.layers.0.bias")), approximate="tanh")
        x = x + F.linear(h, p("ff.layers.2.weight"), p("ff.layers.2.bias"))
    x = F.layer_norm(x, (cfg.emb_dim,), sd["final_norm.scale"], sd["final_norm.shift"], eps=1e-5)
    return x @ sd["out_head.weight"].T


@pytest.mark.parametrize("qkv_bias, tie", [(False, False), (True, True)])
def test_logits_match_an_independent_implementation(qkv_bias, tie):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, context_length=32, emb_dim=48, n_heads=6, n_layers=3, qkv_bias=qkv_bias, tie_weights=tie)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # move LayerNorm/bias params off their trivial init
            p.add_(0.02 * torch.randn_like(p))
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        logits = model(idx)
        assert logits.shape == (2, 20, 97)
        torch.testing.assert_close(logits, reference_logits(model, idx), atol=1e-5, rtol=1e-5)


def test_source_walkthrough_batch_shape(enc):
    torch.manual_seed(123)
    model = GPTModel(PRESETS["seed-124M"]).eval()
    batch = torch.tensor([enc.encode("Every effort moves you"), enc.encode("Every day holds a")])
    with torch.no_grad():
        assert model(batch).shape == (2, 4, 50257)


def test_gelu_and_layernorm_numerics():
    x = torch.linspace(-6, 6, 101)
    expected = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    torch.testing.assert_close(GELU()(x), expected)
    ln = LayerNorm(101)
    y = ln(x.unsqueeze(0))
    torch.testing.assert_close(y, F.layer_norm(x.unsqueeze(0), (101,), eps=1e-5))
    assert torch.allclose(y.var(-1, unbiased=False), torch.tensor(1.0), atol=1e-4)


def test_kv_cache_matches_full_recompute_over_many_steps():
    torch.manual_seed(1)
    cfg = GPTConfig(vocab_size=211, context_length=96, emb_dim=32, n_heads=4, n_layers=3, qkv_bias=True)
    model = GPTModel(cfg).eval()
    idx = torch.randint(0, 211, (2, 90))
    cache = KVCache.for_model(model, chunk=16)  # small chunks exercise the growth path
    with torch.no_grad():
        full = model(idx)
        prefill = model(idx[:, :10], cache)
        torch.testing.assert_close(prefill, full[:, :10], atol=1e-4, rtol=0)
        for t in range(10, 90):  # 80 single-token steps
            step = model(idx[:, t : t + 1], cache)
            assert (step - full[:, t : t + 1]).abs().max() <= 1e-4
    assert cache.length == 90
    assert cache.used_bytes == 2 * 3 * 2 * 90 * 32 * 4
    assert cache.nbytes >= cache.used_bytes


def test_kv_cache_truncate_then_continue(tiny_model):
    idx = torch.randint(0, 50257, (1, 20))
    cache = KVCache.for_model(tiny_model)
    with torch.no_grad():
        tiny_model(idx, cache)
        cache.truncate(12)
        out = tiny_model(idx[:, 12:15], cache)
        torch.testing.assert_close(out, tiny_model(idx[:, :15])[:, 12:], atol=1e-5, rtol=0)


def test_last_only_equals_last_position(tiny_model):
    # Not bit-exact: out_head runs on a (2, 1, emb) input here and on (2, 9, emb) there, and which
    # GEMM kernel (and summation order) MKL picks depends on the shape and the CPU. float32 keeps
    # ~7 significant digits; these logits are O(1), so 1e-6 absolute plus 1e-5 relative is a few ulps.
    idx = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(idx, last_only=True), tiny_model(idx)[:, -1:], atol=1e-6, rtol=1e-5)


def test_attention_capture_is_causal_and_costs_nothing(tiny_model, tiny_cfg):
    idx = torch.randint(0, 50257, (2, 12))
    trace = Trace()
    with torch.no_grad():
        plain = tiny_model(idx)
        traced = tiny_model(idx, trace=trace)
    # Exact: the trace only copies tensors out; both calls run the same kernels on the same shapes.
    assert torch.equal(plain, traced)  # observation does not change the numbers
    assert len(trace.attentions) == tiny_cfg.n_layers
    for w in trace.attentions:
        assert w.shape == (2, tiny_cfg.n_heads, 12, 12)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, tiny_cfg.n_heads, 12))
        assert torch.all(w.triu(diagonal=1) == 0)
    residuals = trace.residuals
    assert len(residuals) == tiny_cfg.n_layers and residuals[-1].shape == (2, 12, tiny_cfg.emb_dim)
    # The logit lens of the last block's residual is the model's own output.
    torch.testing.assert_close(tiny_model.logit_lens(residuals[-1]), plain)


def test_trace_last_rows_and_layers(tiny_model):
    idx = torch.randint(0, 50257, (1, 10))
    full, part = Trace(), Trace(layers=[1], last_rows=1)
    with torch.no_grad():
        tiny_model(idx, trace=full)
        tiny_model(idx, trace=part)
    assert [k for k in part.tensors] == [(1, "attn_weights"), (1, "residual")]
    # Exact: layers/last_rows only choose what is copied out of the same full forward pass.
    assert torch.equal(part.attentions[0], full.attentions[1][:, :, -1:, :])


def test_cached_attention_rows_equal_full_attention(tiny_model):
    idx = torch.randint(0, 50257, (1, 16))
    full = Trace(names=["attn_weights"])
    cache = KVCache.for_model(tiny_model)
    with torch.no_grad():
        tiny_model(idx, trace=full)
        tiny_model(idx[:, :15], cache)
        step = Trace(names=["attn_weights"])
        tiny_model(idx[:, 15:], cache, trace=step)
    for a, b in zip(full.attentions, step.attentions):
        torch.testing.assert_close(b, a[:, :, -1:, :], atol=1e-6, rtol=0)


def test_dropout_is_off_in_eval_mode_and_on_in_training(tiny_cfg):
    torch.manual_seed(5)
    model = GPTModel(tiny_cfg)
    idx = torch.randint(0, 50257, (1, 8))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_same_seed_same_weights(tiny_cfg):
    torch.manual_seed(123)
    a = GPTModel(tiny_cfg).state_dict()
    torch.manual_seed(123)
    b = GPTModel(tiny_cfg).state_dict()
    torch.manual_seed(124)
    c = GPTModel(tiny_cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["tok_emb.weight"], c["tok_emb.weight"])


def test_tied_model_shares_one_parameter():
    cfg = GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1, tie_weights=True)
    model = GPTModel(cfg)
    assert model.out_head.weight is model.tok_emb.weight
    assert n_params(model) == sum(p.numel() for name, p in model.named_parameters() if name != "out_head.weight")


def test_too_long_input_is_refused(tiny_model, tiny_cfg):
    with pytest.raises(ValueError, match="context_length=64"):
        tiny_model(torch.zeros(1, tiny_cfg.context_length + 1, dtype=torch.long))
    cache = KVCache.for_model(tiny_model)
    with torch.no_grad():
        tiny_model(torch.zeros(1, 64, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="longer than context_length"):
        tiny_model(torch.zeros(1, 1, dtype=torch.long), cache)


def test_head_mask_of_ones_changes_nothing(tiny_model, tiny_cfg):
    idx = torch.randint(0, 50257, (1, 7))
    ones = torch.ones(tiny_cfg.n_layers, tiny_cfg.n_heads)
    with torch.no_grad():
        # Exact: the same kernels, plus a multiplication by 1.0, which is exact in IEEE arithmetic.
        assert torch.equal(tiny_model(idx), tiny_model(idx, head_mask=ones))
        assert not torch.equal(tiny_model(idx), tiny_model(idx, head_mask=ones.index_fill(1, torch.tensor([0]), 0)))
    with pytest.raises(ValueError, match="head_mask"):
        tiny_model(idx, head_mask=torch.ones(3, 3))


def test_select_device(monkeypatch):
    monkeypatch.setenv("GPTVIZ_DEVICE", "cpu")
    assert select_device() == torch.device("cpu")
    monkeypatch.delenv("GPTVIZ_DEVICE")
    expected = "cuda" if torch.cuda.is_available() else None
    if expected:
        assert select_device().type == "cuda"
    else:
        assert select_device().type in {"mps", "cpu"}


def test_model_runs_on_the_selected_device(tiny_cfg):
    device = select_device()
    model = GPTModel(tiny_cfg).to(device).eval()
    idx = torch.randint(0, 50257, (1, 5), device=device)
    cache = KVCache.for_model(model)
    with torch.no_grad():
        full = model(idx)
        model(idx[:, :4], cache)
        step = model(idx[:, 4:], cache)
    assert full.device.type == device.type
    torch.testing.assert_close(step, full[:, 4:], atol=1e-4, rtol=0)
