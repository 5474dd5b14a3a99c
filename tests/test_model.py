import copy
import math

import pytest
import torch
import torch.nn.functional as F

from gptviz import PRESETS, GPTConfig, GPTModel, KVCache, Trace, select_device
from gptviz.kernels import book_kernels
from gptviz.model import GELU, LayerNorm, MultiHeadAttention
from gptviz.params import count_params

from .conftest import assert_clear_top1
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
    # Contiguous copies: the reference multiplies in nn.Linear's own (out, in) layout, whatever
    # layout GPTModel.optimize_layout_ chose for the model's own products.
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
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
    cache = KVCache.for_config(model.cfg, chunk=16)  # small chunks exercise the growth path
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
    cache = KVCache.for_config(tiny_model.cfg)
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


def test_head_false_stops_at_the_last_blocks_residual(tiny_model):
    idx = torch.randint(0, 50257, (2, 9))
    trace = Trace(("residual",))
    with torch.no_grad():
        plain = tiny_model(idx)
        hidden = tiny_model(idx, trace=trace, head=False)
        last = tiny_model(idx, head=False, last_only=True)
        rows = tiny_model(idx, head=False, last_only=torch.tensor([3, 8]))
    # Exact: head=False runs the same blocks on the same shapes and stops before final_norm.
    assert hidden.shape == (2, 9, tiny_model.cfg.emb_dim) and torch.equal(hidden, trace.residuals[-1])
    assert torch.equal(last, hidden[:, -1:]) and torch.equal(rows[:, 0], hidden[[0, 1], [3, 8]])
    # Exact too: the head run afterwards is the forward's own final_norm and out_head on the same rows.
    assert torch.equal(tiny_model.logit_lens(hidden), plain)


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
    cache = KVCache.for_config(tiny_model.cfg)
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
    cache = KVCache.for_config(tiny_model.cfg)
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
    cache = KVCache.for_config(model.cfg)
    with torch.no_grad():
        full = model(idx)
        model(idx[:, :4], cache)
        step = model(idx[:, 4:], cache)
    assert full.device.type == device.type
    torch.testing.assert_close(step, full[:, 4:], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- NEW (speed): memory layout


def plain_copy(model: GPTModel) -> GPTModel:
    """The same model with every weight in nn.Linear's own contiguous (out, in) storage, each
    in its own buffer: the book's layout (its forward then calls each module, unfused)."""
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for p in plain.parameters():
            p.data = p.detach().clone(memory_format=torch.contiguous_format)
    return plain


def fused(att: MultiHeadAttention, dtype: torch.dtype = torch.float32) -> bool:
    """Whether this attention runs its three projections as one product (in inference)."""
    with torch.no_grad():
        return att._fused_qkv(torch.zeros(1, 1, att.W_query.in_features, dtype=dtype)) is not None


def is_plain(model: GPTModel) -> bool:
    return all(p.is_contiguous() for p in model.parameters()) and not any(fused(b.att) for b in model.trf_blocks)


def as_book(model: GPTModel) -> GPTModel:
    """``model``, its forward run with the book's kernels (F.linear for every product)."""
    forward = model.forward

    def book_forward(*args, **kwargs):
        with book_kernels():
            return forward(*args, **kwargs)

    model.forward = book_forward
    return model


def wiggled(cfg: GPTConfig, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # move LayerNorm/bias params off their trivial init
            p.add_(0.02 * torch.randn_like(p))
    return model


def layout_cfg(qkv_bias: bool, tie: bool) -> GPTConfig:
    return GPTConfig(vocab_size=211, context_length=40, emb_dim=48, n_heads=4, n_layers=3, qkv_bias=qkv_bias, tie_weights=tie)


# float32 tolerance between layouts: the same products summed in other orders by other kernels
# (48- to 192-term dot products of O(1) values): a few ulps of the O(1)-O(10) logits, ~1e-6; 1e-5 is safe.
LAYOUT_TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_fast_layout_gives_the_plain_layouts_logits(qkv_bias, tie):
    model = wiggled(layout_cfg(qkv_bias, tie))
    plain = plain_copy(model)
    assert is_plain(plain) and not is_plain(model)  # both layouts really differ
    att = model.trf_blocks[0].att
    assert fused(att)  # the fused product is taken
    # the three projections are row blocks of one (3·out, in) buffer, each (out, in) contiguous
    assert att.W_key.weight.data_ptr() == att.W_query.weight.data_ptr() + 48 * 48 * 4
    assert all(p.is_contiguous() for p in model.parameters())
    assert (model.out_head.weight is model.tok_emb.weight) == tie
    idx = torch.randint(0, 211, (2, 30))
    heads = torch.ones(3, 4).index_fill_(1, torch.tensor([1]), 0)  # one head off in every layer
    # the reference: the book's layout and the book's kernels (F.linear for every product)
    as_book(plain)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), plain(idx), **LAYOUT_TOL)
        torch.testing.assert_close(model(idx, head_mask=heads), plain(idx, head_mask=heads), **LAYOUT_TOL)
        fast_cache, plain_cache = KVCache.for_config(model.cfg, chunk=8), KVCache.for_config(plain.cfg, chunk=8)
        torch.testing.assert_close(model(idx[:, :20], fast_cache), plain(idx[:, :20], plain_cache), **LAYOUT_TOL)
        for t in range(20, 30):  # cached single-token steps, as generation runs them
            step = model(idx[:, t : t + 1], fast_cache, head_mask=heads, last_only=True)
            torch.testing.assert_close(step, plain(idx[:, t : t + 1], plain_cache, head_mask=heads, last_only=True), **LAYOUT_TOL)
        trace_fast, trace_plain = Trace(names=None), Trace(names=None)
        model(idx, trace=trace_fast)
        plain(idx, trace=trace_plain)
    assert trace_fast.tensors.keys() == trace_plain.tensors.keys()
    for key, t in trace_fast.tensors.items():
        torch.testing.assert_close(t, trace_plain.tensors[key], **LAYOUT_TOL)


def test_layout_keeps_names_counts_values_and_tying():
    cfg = layout_cfg(True, True)
    model = wiggled(cfg)
    plain = plain_copy(model)
    assert list(model.state_dict()) == list(plain.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(v, plain.state_dict()[k]) and v.shape == plain.state_dict()[k].shape, k
    assert n_params(model) == n_params(plain) == count_params(cfg)
    # Idempotent: a second call copies nothing.
    before = [p.data_ptr() for p in model.parameters()]
    model.optimize_layout_()
    assert [p.data_ptr() for p in model.parameters()] == before
    # The three projections are views of one buffer; the tied head is one Parameter.
    att = model.trf_blocks[1].att
    assert att.W_key.weight.untyped_storage().data_ptr() == att.W_query.weight.untyped_storage().data_ptr()
    assert model.out_head.weight is model.tok_emb.weight


def test_the_source_state_dict_loads_into_the_fast_layout():
    cfg = layout_cfg(True, False)
    source = plain_copy(wiggled(cfg, seed=3))  # a checkpoint saved in the book's layout
    book_state = {k: v.clone() for k, v in source.state_dict().items()}
    idx = torch.randint(0, 211, (1, 25))
    copied = GPTModel(cfg).eval()
    copied.load_state_dict(book_state)  # copies into the existing (fast) layout
    with torch.no_grad():
        expected = copied(idx)
        torch.testing.assert_close(expected, source(idx), **LAYOUT_TOL)
    assert not is_plain(copied)
    # assign=True (what gptviz.files.weights does) replaces the Parameters by the checkpoint's own
    # tensors; the model lays them out again.
    with torch.device("meta"):
        assigned = GPTModel(cfg)
    assigned.load_state_dict({k: v.clone() for k, v in book_state.items()}, assign=True)
    for block in assigned.trf_blocks:  # the causal masks are in no checkpoint (as gptviz.files.weights does)
        block.att.mask = torch.triu(torch.ones(40, 40, dtype=torch.bool), diagonal=1)
    assert not is_plain(assigned)
    with torch.no_grad():
        assert torch.equal(assigned.eval()(idx), expected)  # exact: the same layout, the same kernels


def test_assign_load_of_a_tied_checkpoint_ties_again():
    cfg = layout_cfg(False, True)
    source = wiggled(cfg, seed=4)
    state = {k: v.contiguous().clone() for k, v in source.state_dict().items() if k != "out_head.weight"}
    state["out_head.weight"] = state["tok_emb.weight"]  # one tensor under both names, as gptviz.files.weights builds it
    with torch.device("meta"):
        model = GPTModel(cfg)
    model.load_state_dict(state, assign=True)
    assert model.out_head.weight is model.tok_emb.weight
    assert model.out_head.weight.is_contiguous()  # (out, in): the logit lens's rows read it fastest so
    assert n_params(model) == n_params(source)


def test_forward_hooks_see_every_projection_and_shapes_do_not_change(tiny_model, tiny_cfg):
    seen = []
    att = tiny_model.trf_blocks[0].att
    handles = [getattr(att, n).register_forward_hook(lambda m, a, o, n=n: seen.append((n, tuple(o.shape))))
               for n in ("W_query", "W_key", "W_value")]
    idx = torch.randint(0, 50257, (1, 5))
    try:
        with torch.no_grad():
            hooked = tiny_model(idx)
    finally:
        for h in handles:
            h.remove()
    assert seen == [("W_key", (1, 5, 32)), ("W_query", (1, 5, 32)), ("W_value", (1, 5, 32))]  # the book's order
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(idx), hooked, **LAYOUT_TOL)  # fused again without hooks
    assert fused(att)


def test_gradients_flow_through_the_plain_path():
    cfg = layout_cfg(True, False)
    model = wiggled(cfg, seed=5).train()
    plain = plain_copy(model).train()
    idx = torch.randint(0, 211, (2, 12))
    for m in (model, plain):
        torch.manual_seed(7)  # the same dropout masks
        m(idx).logsumexp(-1).sum().backward()
    grads = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_conversion_and_copies_keep_a_fitting_layout(dtype):
    model = wiggled(layout_cfg(True, True))
    low = copy.deepcopy(model).to(dtype)
    att = low.trf_blocks[0].att
    # every dtype reads nn.Linear's (out, in) fastest: rows, still one qkv buffer
    assert att.W_query.weight.is_contiguous() and low.out_head.weight.is_contiguous()
    assert fused(att, dtype)
    assert low.out_head.weight is low.tok_emb.weight and low.dtype == dtype
    back = copy.deepcopy(low).float()
    assert not is_plain(back) and fused(back.trf_blocks[0].att)
    assert model.dtype == torch.float32 and not is_plain(model)  # the original is untouched


# --------------------------------------------------------------------------- NEW (float16)


def clear_margin_inputs(model: GPTModel, n: int, length: int, margin: float) -> torch.Tensor:
    """Random sequences whose float32 next-token top-1 leads the runner-up by ``margin``."""
    g = torch.Generator().manual_seed(11)
    kept = []
    with torch.no_grad():
        while len(kept) < n:
            idx = torch.randint(0, model.cfg.vocab_size, (1, length), generator=g)
            top2 = model(idx, last_only=True)[0, -1].topk(2).values
            if top2[0] - top2[1] > margin:
                kept.append(idx)
    return torch.cat(kept)


# Tolerances relative to the logit scale (max |logit|): float16 keeps 11 significant bits
# (unit roundoff 4.9e-4), bfloat16 8 (3.9e-3); rounding the weights and each of ~20 sequential
# operations (3 blocks) adds a few units each. Measured on this test's inputs: 6e-4 (float16) and
# 4e-3 (bfloat16) of the scale; 1e-2 and 5e-2 leave >10x room for other CPUs' kernels.
LOW_TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_agree_with_float32(dtype):
    cfg = layout_cfg(True, True).replace(emb_dim=64, context_length=64)
    model = wiggled(cfg, seed=2)
    low = copy.deepcopy(model).to(dtype)
    scale_tol = LOW_TOL[dtype]
    idx = torch.randint(0, 211, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = model(idx), low(idx)
    assert out.dtype == dtype and torch.isfinite(out).all()
    scale = ref.abs().max().item()
    assert scale > 1
    assert (out.float() - ref).abs().max().item() <= scale_tol * scale
    assert (out.float() - ref).abs().max().item() > 0  # it really ran in low precision
    # Top-1 agrees wherever float32's lead is far beyond the tolerance.
    margin = 4 * scale_tol * scale
    picks = clear_margin_inputs(model, 4, 16, margin)
    with torch.no_grad():
        ref_top, low_top = model(picks, last_only=True), low(picks, last_only=True)
    assert_clear_top1(ref_top, margin)
    assert torch.equal(ref_top.argmax(-1), low_top.float().argmax(-1))
    # KV-cached float16 steps agree with their own full recompute (a cached step is what generation runs).
    cache = KVCache.for_config(low.cfg)
    with torch.no_grad():
        low(idx[:, :40], cache)
        step = low(idx[:, 40:41], cache).float()
    torch.testing.assert_close(step, out[:, 40:41].float(), atol=scale_tol * scale, rtol=0)


def test_float16_layernorm_softmax_and_gelu_stay_finite():
    # GPT-2's residual stream has a few dimensions of O(1000): their squares overflow float16 (65504).
    x = torch.randn(3, 768, generator=torch.Generator().manual_seed(0))
    x[:, 5] = 3000.0
    ln = LayerNorm(768)
    with torch.no_grad():
        ln.scale.add_(0.1 * torch.randn(768))
    ln16 = copy.deepcopy(ln).half()
    y16 = ln16(x.half())
    assert y16.dtype == torch.float16 and torch.isfinite(y16).all()
    # float16 output rounding: 2^-11 relative of |y| <= ~30 -> 1.5e-2; inputs rounded to float16 too.
    torch.testing.assert_close(y16.float(), ln(x.half().float()), atol=2e-2, rtol=1e-3)
    # GELU: x**3 overflows float16 beyond |x| ~ 40; tanh(±inf) = ±1 gives x and 0, as in float32.
    g = torch.tensor([-300.0, -50.0, -3.0, -0.5, 0.0, 0.5, 3.0, 50.0, 300.0])
    g16 = GELU()(g.half())
    assert torch.isfinite(g16).all()
    torch.testing.assert_close(g16.float(), GELU()(g), atol=1e-3, rtol=1e-3)  # float16 rounding: 2^-11 relative
    # The attention's masked -inf and softmax in float16: rows sum to one, zero above the diagonal.
    att = MultiHeadAttention(16, 16, 8, 0.0, 2).eval().half()
    trace = Trace(names=["attn_weights"])
    with torch.no_grad():
        att(torch.randn(1, 8, 16).half(), trace=trace.layer(0))
    w = trace.attentions[0]
    assert w.dtype == torch.float16 and torch.all(w.triu(1) == 0)
    torch.testing.assert_close(w.float().sum(-1), torch.ones(1, 2, 8), atol=2e-3, rtol=0)  # 8 terms, 2^-11 each


def test_layer_norm_keeps_float64_in_float64():
    # The half-precision guard must not round a float64 input to float32 (gradcheck needs float64).
    norm = LayerNorm(8).double()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert norm(x).dtype == torch.float64
    assert torch.autograd.gradcheck(norm, (x,))
