"""gptviz.analysis.explain: logit attribution, the sub-block logit lens and saliency, against independent
computations (the plain forward, module hooks, finite differences, a model copy's backward)."""

from __future__ import annotations

import copy
import random
import threading
import types

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gptviz import PRESETS, GPTConfig, GPTModel
from gptviz.analysis.explain import ATTRIBUTION_KINDS, decided_at, decided_row, lens_table, logit_attribution, saliency

from .conftest import assert_clear_top1

pytestmark = pytest.mark.numeric

#: The spec's bound for "the contributions sum to the logit difference" in float32. The two sides
#: are the same real number computed by different float32 sums (the forward's LayerNorm + one dot
#: product of length emb vs a sum of ~150 centred dot products); at logit size ~5 the rounding is
#: ~1e-5 (measured ≤ 2e-6 on these models), so 1e-3 has a wide margin and still catches any
#: missing piece (the smallest pieces are ~1e-3, a missing bias or feed-forward is ≥ 1e-2).
SUM_TOL = 1e-3


@pytest.fixture(scope="module")
def seed_model() -> GPTModel:
    torch.manual_seed(123)
    return GPTModel(PRESETS["seed-124M"]).eval()


@torch.no_grad()
def real_logits(model: GPTModel, ids, head_mask=None) -> torch.Tensor:
    """The last position's logits of the plain forward (all positions, no trace), float32."""
    return model(torch.tensor([ids], device=model.device), head_mask=head_mask)[0, -1].float()


def random_model(seed: int, vocab: int, ctx: int, heads: int, head_dim: int, layers: int, qkv_bias: bool,
                 tie: bool) -> GPTModel:
    """A small model with random LayerNorm scales and shifts too (the defaults, ones and zeros,
    would make the final norm's shift contribute exactly 0 and hide mistakes in it)."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, context_length=ctx, emb_dim=heads * head_dim, n_heads=heads, n_layers=layers,
                    drop_rate=0.1, qkv_bias=qkv_bias, tie_weights=tie)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "LayerNorm":
                module.scale.normal_(1.0, 0.3)
                module.shift.normal_(0.0, 0.3)
    return model


def prompts(seed: int, n: int, vocab: int, max_len: int) -> list[tuple[list[int], int]]:
    """n random (ids, target) pairs of 1..max_len tokens."""
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(1, max_len))], rng.randrange(vocab)) for _ in range(n)]


def contributions(df: pd.DataFrame) -> torch.Tensor:
    return torch.tensor(df["contribution"].to_numpy(), dtype=torch.float64)


# --------------------------------------------------------------------------- logit attribution


def test_attribution_rows_name_every_piece_of_the_residual_stream(tiny_model):
    cfg = tiny_model.cfg
    df = logit_attribution(tiny_model, [15496, 11, 314, 716], target=5)
    assert list(df.columns[:5]) == ["component", "layer", "head", "kind", "contribution"]
    assert len(df) == 1 + cfg.n_layers * (cfg.n_heads + 2) + 1
    expected = ["embeddings"]
    for i in range(cfg.n_layers):
        expected += [f"block {i} · head {h}" for h in range(cfg.n_heads)]
        expected += [f"block {i} · attention bias", f"block {i} · feed-forward"]
    expected.append("final norm shift")
    assert df["component"].tolist() == expected
    assert set(df["kind"]) == set(ATTRIBUTION_KINDS)
    assert df["layer"].iloc[0] is None and df["layer"].iloc[-1] is None
    heads = df[df["kind"] == "head"]
    assert heads["layer"].tolist() == [i for i in range(cfg.n_layers) for _ in range(cfg.n_heads)]
    assert heads["head"].tolist() == list(range(cfg.n_heads)) * cfg.n_layers
    assert df.loc[df["kind"] != "head", "head"].map(lambda v: v is None).all()
    assert df["contribution"].map(lambda v: isinstance(v, float)).all()
    assert df.attrs["target"] == 5 and df.attrs["baseline"] != 5 and df.attrs["n_tokens"] == 4


def test_attribution_sums_to_the_plain_forwards_logit_difference_tiny(tiny_model):
    for k, (ids, target) in enumerate(prompts(1, 20, tiny_model.cfg.vocab_size, 64)):
        logits = real_logits(tiny_model, ids)
        baseline = None if k % 2 else random.Random(k).randrange(tiny_model.cfg.vocab_size)
        if baseline == target:
            baseline = None
        df = logit_attribution(tiny_model, ids, target, baseline)
        b = df.attrs["baseline"]
        if baseline is None:  # the runner-up: no other token is ahead of it (1e-5: last_only vs full kernels)
            others = logits.clone()
            others[target] = -torch.inf
            assert b != target and logits[b] >= others.max() - 1e-5
        else:
            assert b == baseline
        diff = float(logits[target] - logits[b])
        assert abs(contributions(df).sum().item() - diff) < SUM_TOL
        assert abs(df.attrs["logit_diff"] - diff) < 1e-5  # same logits, last_only vs full-sequence kernels


def test_attribution_sums_to_the_logit_difference_on_the_124M_model(seed_model):
    for ids, target in prompts(2, 5, seed_model.cfg.vocab_size, 12):
        df = logit_attribution(seed_model, ids, target)
        logits = real_logits(seed_model, ids)
        diff = float(logits[target] - logits[df.attrs["baseline"]])
        assert abs(contributions(df).sum().item() - diff) < SUM_TOL


def test_runner_up_of_the_top_token_is_the_second_best(tiny_model):
    ids = [464, 3290, 318, 257, 1263]
    logits = real_logits(tiny_model, ids)
    assert_clear_top1(logits)
    top2 = logits.topk(3)
    assert float(top2.values[1] - top2.values[2]) > 1e-4, "near-tie for the runner-up: choose another input"
    df = logit_attribution(tiny_model, ids, int(top2.indices[0]))
    assert df.attrs["baseline"] == int(top2.indices[1])
    assert df.attrs["logit_diff"] > 0


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([2, 4, 8]),
    layers=st.integers(1, 3),
    qkv_bias=st.booleans(),
    tie=st.booleans(),
    data=st.data(),
)
def test_contributions_are_linear_in_the_token_pair(seed, heads, head_dim, layers, qkv_bias, tie, data):
    vocab, ctx = 50, 12
    model = random_model(seed, vocab, ctx, heads, head_dim, layers, qkv_bias, tie)
    ids = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=ctx + 4), label="ids")
    a, b, c = data.draw(st.lists(st.integers(0, vocab - 1), min_size=3, max_size=3, unique=True), label="a, b, c")
    ab, ac, bc = (contributions(logit_attribution(model, ids, s, t)) for s, t in ((a, b), (a, c), (b, c)))
    # Each side is a float32 dot product of size ≤ 1 in units of logits: rounding ~1e-7, 1e-4 is far above it.
    torch.testing.assert_close(ab, ac - bc, atol=1e-4, rtol=0)
    logits = real_logits(model, ids[-ctx:])
    assert abs(ab.sum().item() - float(logits[a] - logits[b])) < SUM_TOL


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    heads=st.integers(1, 4),
    layers=st.integers(1, 3),
    qkv_bias=st.booleans(),
    tie=st.booleans(),
    data=st.data(),
)
def test_a_head_switched_off_contributes_exactly_zero(seed, heads, layers, qkv_bias, tie, data):
    vocab, ctx = 60, 10
    model = random_model(seed, vocab, ctx, heads, 4, layers, qkv_bias, tie)
    ids = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=ctx), label="ids")
    target = data.draw(st.integers(0, vocab - 1), label="target")
    off = data.draw(st.lists(st.tuples(st.integers(0, layers - 1), st.integers(0, heads - 1)), min_size=1, max_size=3),
                    label="heads off")
    mask = torch.ones(layers, heads)
    for layer, head in off:
        mask[layer, head] = 0
    df = logit_attribution(model, ids, target, head_mask=mask)
    rows = df[df["kind"] == "head"].set_index(["layer", "head"])["contribution"]
    for layer, head in off:
        assert rows[(layer, head)] == 0.0  # exact: its context vector is multiplied by 0
    logits = real_logits(model, ids, head_mask=mask)
    assert abs(contributions(df).sum().item() - float(logits[target] - logits[df.attrs["baseline"]])) < SUM_TOL
    if any(mask[i, h] for i in range(layers) for h in range(heads)):  # the other heads still speak
        on = [(i, h) for i in range(layers) for h in range(heads) if mask[i, h]]
        assert any(rows[key] != 0.0 for key in on)


@pytest.mark.parametrize("masked", [False, True])
def test_per_head_split_matches_each_blocks_whole_attention_output(tiny_model, masked):
    """Hooks capture what each module really added at the last position; pushed through the
    final norm's linear map by hand, these match the attribution's rows."""
    model, cfg = tiny_model, tiny_model.cfg
    ids, target, baseline = [40, 1101, 407, 1654, 703, 284, 910], 2068, 318
    mask = torch.ones(cfg.n_layers, cfg.n_heads)
    if masked:
        mask[1, 2] = 0
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda module, args, output: seen.__setitem__(name, output[0, -1].detach().clone())

    handles = [model.drop_emb.register_forward_hook(keep("embeddings")),
               model.final_norm.register_forward_pre_hook(
                   lambda module, args: seen.__setitem__("final", args[0][0, -1].detach().clone()))]
    for i, block in enumerate(model.trf_blocks):
        handles += [block.att.register_forward_hook(keep(f"att {i}")), block.ff.register_forward_hook(keep(f"ff {i}"))]
    try:
        real_logits(model, ids, head_mask=mask if masked else None)
    finally:
        for h in handles:
            h.remove()
    assert not model.final_norm._forward_pre_hooks and not model.drop_emb._forward_hooks

    x = seen["final"]
    sigma = torch.sqrt(x.var(unbiased=False) + model.final_norm.eps)
    d = model.out_head.weight[target] - model.out_head.weight[baseline]

    def through_norm(c: torch.Tensor) -> float:
        return float((model.final_norm.scale * (c - c.mean()) / sigma).detach() @ d.detach())

    df = logit_attribution(model, ids, target, baseline, head_mask=mask if masked else None)
    by = df.set_index("component")["contribution"]
    # float32, the same products summed in another order, values ≤ ~1: 1e-5 is ~100 ulps.
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by["embeddings"], through_norm(seen["embeddings"]), **tol)
    for i in range(cfg.n_layers):
        heads = sum(by[f"block {i} · head {h}"] for h in range(cfg.n_heads))
        torch.testing.assert_close(heads + by[f"block {i} · attention bias"], through_norm(seen[f"att {i}"]), **tol)
        torch.testing.assert_close(by[f"block {i} · feed-forward"], through_norm(seen[f"ff {i}"]), **tol)
    torch.testing.assert_close(by["final norm shift"], float(model.final_norm.shift.detach() @ d.detach()), **tol)
    if masked:
        assert by["block 1 · head 2"] == 0.0


def test_attribution_on_a_bf16_model_is_computed_in_float32(tiny_model):
    low = copy.deepcopy(tiny_model).to(torch.bfloat16).eval()
    for ids, target in prompts(3, 5, low.cfg.vocab_size, 40):
        df = logit_attribution(low, ids, target)
        ref = logit_attribution(tiny_model, ids, target, df.attrs["baseline"])
        assert df["contribution"].map(lambda v: isinstance(v, float)).all()
        # bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.002): each logit (|logit| ≲ 8) is
        # off by ≤ 0.016 and the bf16 residual pieces by a few 0.1 % of themselves, so 0.06 covers
        # the logit difference; measured ≤ 0.017.
        assert abs(contributions(df).sum().item() - df.attrs["logit_diff"]) < 0.06
        # and every piece agrees with the float32 model's to bf16's precision (measured ≤ 0.004)
        torch.testing.assert_close(contributions(df), contributions(ref), atol=0.02, rtol=0.02)


def test_ids_longer_than_the_context_are_cropped_like_generation(tiny_model):
    ctx = tiny_model.cfg.context_length
    ids, target = list(range(1000, 1000 + ctx + 9)), 77
    long, short = logit_attribution(tiny_model, ids, target), logit_attribution(tiny_model, ids[-ctx:], target)
    pd.testing.assert_frame_equal(long, short)  # the same computation on the same ids: exact
    assert long.attrs == short.attrs and long.attrs["n_tokens"] == ctx
    pd.testing.assert_frame_equal(lens_table(tiny_model, ids), lens_table(tiny_model, ids[-ctx:]))
    assert torch.equal(saliency(tiny_model, ids, target), saliency(tiny_model, ids[-ctx:], target))


def test_training_mode_and_bad_arguments_are_refused():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=30, context_length=8, emb_dim=8, n_heads=2, n_layers=1)).train()
    for call in (lambda: logit_attribution(model, [1, 2], 3), lambda: lens_table(model, [1, 2]),
                 lambda: saliency(model, [1, 2], 3)):
        with pytest.raises(ValueError, match="training mode"):
            call()
    assert model.training  # the mode was not changed
    model.eval()
    for bad in (
        lambda: logit_attribution(model, [1, 2], 30),
        lambda: logit_attribution(model, [1, 2], -1),
        lambda: logit_attribution(model, [1, 2], 3, baseline=3),
        lambda: logit_attribution(model, [], 3),
        lambda: logit_attribution(model, [1, 31], 3),
        lambda: logit_attribution(model, [1, 2], 3, head_mask=torch.ones(2, 2)),
        lambda: lens_table(model, [1, 2], head_mask=torch.ones(1, 3)),
        lambda: saliency(model, [1, 2], 2.5),
        lambda: saliency(model, [1, 2], 3, head_mask=torch.ones(2, 1)),
    ):
        with pytest.raises(ValueError):
            bad()


# --------------------------------------------------------------------------- lens


def check_last_row_is_the_models_prediction(model, ids, head_mask=None):
    logits = real_logits(model, ids, head_mask)
    assert_clear_top1(logits)  # a near-tie could flip between the lens's and the forward's kernels
    table = lens_table(model, ids, head_mask=head_mask)
    cfg = model.cfg
    assert len(table) == 2 * cfg.n_layers
    assert table["layer"].tolist() == [i for i in range(cfg.n_layers) for _ in range(2)]
    assert table["after"].tolist() == ["attention", "feed-forward"] * cfg.n_layers
    last = table.iloc[-1]
    p = torch.softmax(logits, -1)
    assert last["top1_id"] == int(logits.argmax()) == last["final_id"]
    assert (table["final_id"] == int(logits.argmax())).all()
    assert last["final_rank"] == 0
    # same residual, same norm, the out_head product batched with other rows: agreement ~1e-7
    assert abs(last["top1_prob"] - float(p.max())) < 1e-5
    assert abs(last["final_prob"] - float(p.max())) < 1e-5
    assert abs(last["kl_from_final"]) < 1e-5
    return table


def test_lens_last_row_is_the_models_prediction_tiny(tiny_model):
    checked = 0
    for ids, _ in prompts(5, 30, tiny_model.cfg.vocab_size, 64):
        top2 = real_logits(tiny_model, ids).topk(2).values
        if float(top2[0] - top2[1]) <= 1e-4:  # a near-tie in a random model: skip (counted below)
            continue
        check_last_row_is_the_models_prediction(tiny_model, ids)
        checked += 1
    assert checked >= 20


def test_lens_last_row_is_the_models_prediction_124M(seed_model):
    for ids, _ in prompts(6, 5, seed_model.cfg.vocab_size, 12):
        check_last_row_is_the_models_prediction(seed_model, ids)


def test_lens_last_row_with_heads_switched_off(tiny_model):
    mask = torch.ones(tiny_model.cfg.n_layers, tiny_model.cfg.n_heads)
    mask[0, 1] = mask[1, 3] = 0
    ids = [464, 3290, 318, 257, 1263, 290]
    masked = check_last_row_is_the_models_prediction(tiny_model, ids, mask)
    plain = lens_table(tiny_model, ids)
    assert masked.iloc[0]["final_prob"] != plain.iloc[0]["final_prob"]  # the mask reached the forward


@pytest.mark.parametrize("sharpen", [1.0, 8.0])
def test_lens_rows_match_hooked_residuals_pushed_through_the_head(tiny_model, sharpen):
    """Every row, against the residual streams captured by hooks and read out one by one.
    ``sharpen`` scales a copy's (untied) output head: the random model's near-uniform
    distributions make KL(p‖q) ≈ KL(q‖p); sharper ones tell the two directions apart."""
    model = tiny_model
    if sharpen != 1.0:
        model = copy.deepcopy(tiny_model)
        with torch.no_grad():
            model.out_head.weight.mul_(sharpen)
    cfg = model.cfg
    asymmetry = 0.0
    ids = [40, 1101, 407, 1654, 703, 284, 910, 1110, 13]
    captured: list[torch.Tensor] = []

    def before(module, args):
        captured.append(args[0][0, -1].detach().clone())

    def after(module, args, output):
        captured.append(output[0, -1].detach().clone())

    handles = []
    for block in model.trf_blocks:
        handles += [block.register_forward_pre_hook(before), block.att.register_forward_hook(after),
                    block.register_forward_hook(after)]
    try:
        real_logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    final = torch.log_softmax(real_logits(model, ids), -1)
    final_id = int(final.argmax())
    table = lens_table(model, ids)
    for i in range(cfg.n_layers):
        block_in, att_out, block_out = captured[3 * i : 3 * i + 3]
        for row, resid in ((2 * i, att_out + block_in), (2 * i + 1, block_out)):
            with torch.no_grad():
                lg = model.out_head(model.final_norm(resid[None]))[0]  # one row alone
            logp = torch.log_softmax(lg, -1)
            r = table.iloc[row]
            # different matmul shapes (1 row vs 2L rows): probabilities agree to ~1e-8
            assert logp.exp()[r["top1_id"]] >= logp.exp().max() - 1e-6  # a top-1 (robust to ties)
            assert abs(r["top1_prob"] - float(logp.exp().max())) < 1e-6
            assert abs(r["final_prob"] - float(logp.exp()[final_id])) < 1e-6
            lo = int((lg > lg[final_id] + 1e-4).sum())
            hi = int((lg > lg[final_id] - 1e-4).sum())
            assert lo <= r["final_rank"] <= hi
            entropy = float(torch.distributions.Categorical(logits=lg).entropy())
            assert abs(r["entropy"] - entropy) < 1e-4  # ~10 nats summed over 50257 terms
            kl = float(F.kl_div(logp, final, reduction="sum", log_target=True))  # KL(final || row)
            # float32 sums over 50257 terms of KLs ~0.003..0.3: rounding ~1e-7 relative to the terms
            torch.testing.assert_close(r["kl_from_final"], kl, rtol=1e-4, atol=1e-6)
            reverse = float(F.kl_div(final, logp, reduction="sum", log_target=True))  # KL(row || final)
            asymmetry = max(asymmetry, abs(reverse - kl) / max(kl, 1e-6))
    if sharpen != 1.0:
        assert asymmetry > 1e-2  # this case would catch the reverse direction (tolerance above: 1e-4)


def lens_stub(top1: list[int], final: int = 7) -> pd.DataFrame:
    n = len(top1)
    return pd.DataFrame({"layer": [k // 2 for k in range(n)], "after": ["attention", "feed-forward"] * (n // 2),
                         "top1_id": top1, "final_id": [final] * n})


@pytest.mark.parametrize(
    "top1, row, block",
    [
        ([7, 7, 7, 7, 7, 7], 0, 0),
        ([1, 2, 3, 4, 5, 7], 5, 2),
        ([1, 2, 3, 4, 7, 7], 4, 2),  # top-1 after block 2's attention
        ([1, 2, 3, 7, 7, 7], 3, 1),  # after block 1's feed-forward
        ([7, 7, 3, 7, 7, 7], 3, 1),  # an early lead that is lost again does not count
        ([7, 7, 7, 7, 7, 3], None, None),  # not on top at the end (a near-tie): never decided
    ],
)
def test_decided_at_is_the_start_of_the_final_run_of_top1_rows(top1, row, block):
    assert decided_row(lens_stub(top1)) == row
    assert decided_at(lens_stub(top1)) == block


def test_decided_at_on_a_real_table(tiny_model):
    table = check_last_row_is_the_models_prediction(tiny_model, [464, 3290, 318, 257, 1263])
    k = decided_row(table)
    assert k is not None
    assert (table["final_rank"].iloc[k:] == 0).all()
    assert k == 0 or table["final_rank"].iloc[k - 1] > 0
    assert decided_at(table) == table["layer"].iloc[k]


# --------------------------------------------------------------------------- saliency


def state(model: GPTModel) -> tuple:
    return (model.training, [(n, p.requires_grad, p.grad) for n, p in model.named_parameters()],
            [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()])


def test_saliency_leaves_the_model_as_it_was(tiny_model):
    before = state(tiny_model)
    s = saliency(tiny_model, [464, 3290, 318, 257], 1263)
    assert s.shape == (4,) and s.dtype == torch.float32 and not s.requires_grad and (s > 0).all()
    after = state(tiny_model)
    assert after == before
    assert all(grad is None for _, _, grad in after[1])


def test_saliency_leaves_a_partly_frozen_model_as_it_was():
    torch.manual_seed(5)
    model = GPTModel(GPTConfig(vocab_size=80, context_length=16, emb_dim=16, n_heads=2, n_layers=2)).eval()
    frozen = {"tok_emb.weight", "trf_blocks.0.att.W_query.weight", "final_norm.scale", "out_head.weight"}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    before = state(model)
    saliency(model, [3, 1, 4, 1, 5, 9], 2)
    assert state(model) == before
    assert all(p.grad is None for p in model.parameters())
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen


def test_saliency_on_the_124M_model_leaves_no_gradients(seed_model):
    before = state(seed_model)
    for ids, target in prompts(7, 2, seed_model.cfg.vocab_size, 12):
        s = saliency(seed_model, ids, target)
        assert s.shape == (len(ids),) and torch.isfinite(s).all()
    assert state(seed_model) == before


def book_layer_norm(self, x: torch.Tensor) -> torch.Tensor:
    """The book's LayerNorm in the input's dtype. gptviz's LayerNorm casts its input to float32
    (meant for float16/bfloat16, it also rounds float64), which would leave central differences
    with float32 noise / h ≈ 0.1; set on this test's own model instance only."""
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


@pytest.mark.parametrize("masked", [False, True])
def test_saliency_matches_central_finite_differences_in_float64(masked):
    """∂ log p / ∂ e by central differences of the model's own blocks in float64, every coordinate."""
    model = random_model(11, 97, 16, 2, 8, 2, True, False).double()
    for module in model.modules():  # this model's LayerNorms normalise in float64 (see book_layer_norm)
        if type(module).__name__ == "LayerNorm":
            module.forward = types.MethodType(book_layer_norm, module)
    cfg = model.cfg
    mask = None
    if masked:
        mask = torch.ones(cfg.n_layers, cfg.n_heads, dtype=torch.float64)
        mask[0, 1] = 0
    ids, target = [5, 17, 42, 8, 96, 3, 60], 23
    T = len(ids)
    with torch.no_grad():
        e = model.tok_emb(torch.tensor(ids)) + model.pos_emb(torch.arange(T))  # (T, emb)

        def log_p(batch: torch.Tensor) -> torch.Tensor:  # (B, T, emb) -> (B,)
            x = batch
            for i, block in enumerate(model.trf_blocks):
                x = block(x, head_mask=None if mask is None else mask[i])
            return torch.log_softmax(model.out_head(model.final_norm(x[:, -1])), -1)[:, target]

        h = 1e-6
        steps = torch.eye(T * cfg.emb_dim, dtype=torch.float64).view(-1, T, cfg.emb_dim) * h  # (T*emb, T, emb)
        grad = ((log_p(e + steps) - log_p(e - steps)) / (2 * h)).view(T, cfg.emb_dim)
    expected = (grad * e).norm(dim=-1).float()
    # Central differences in float64: truncation ~h² = 1e-12, cancellation ~1e-16/h = 1e-10; the
    # result is then rounded to float32 (relative 6e-8). 1e-5 relative leaves room and no more.
    torch.testing.assert_close(saliency(model, ids, target, head_mask=mask), expected, rtol=1e-5, atol=1e-8)


def test_saliency_matches_a_model_copys_full_backward(tiny_model):
    """The plain full-sequence forward of a deep copy, its embedding output's gradient by .backward()."""
    twin = copy.deepcopy(tiny_model)
    kept = {}

    def hold(module, args, output):
        output.retain_grad()
        kept["emb"] = output

    twin.drop_emb.register_forward_hook(hold)
    for ids, target in prompts(8, 5, tiny_model.cfg.vocab_size, 40):
        twin.zero_grad(set_to_none=True)
        torch.log_softmax(twin(torch.tensor([ids])), -1)[0, -1, target].backward()
        expected = (kept["emb"].grad * kept["emb"].detach())[0].norm(dim=-1)
        # float32, full-sequence vs last-row final norm and head kernels: gradients agree to ~1e-7
        # relative (measured); 1e-4 relative with a floor of 1e-6 for tiny positions.
        torch.testing.assert_close(saliency(tiny_model, ids, target), expected, rtol=1e-4, atol=1e-6)
    assert twin.out_head.weight.grad is not None  # the copy's backward did reach parameters...
    assert all(p.grad is None for p in tiny_model.parameters())  # ...the shared model's never


def test_saliency_works_under_no_grad_and_inference_mode(tiny_model):
    ids, target = [464, 3290, 318, 257], 1263
    plain = saliency(tiny_model, ids, target)
    with torch.no_grad():
        assert torch.equal(saliency(tiny_model, ids, target), plain)
    with torch.inference_mode():
        assert torch.equal(saliency(tiny_model, ids, target), plain)


def test_saliency_beside_concurrent_forward_passes_changes_no_ones_numbers(tiny_model):
    model = tiny_model
    ids = list(range(2000, 2040))
    batch = torch.tensor([ids])
    with torch.no_grad():
        expected = model(batch)  # same thread, before: the same kernels as the other thread's
    alone = saliency(model, ids, 50)
    stop, seen, errors = threading.Event(), [], []

    def forwards():
        try:
            while not stop.is_set() or len(seen) < 5:
                with torch.no_grad():
                    seen.append(model(batch))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    worker = threading.Thread(target=forwards)
    worker.start()
    try:
        results = [saliency(model, ids, 50) for _ in range(20)]
    finally:
        stop.set()
        worker.join()
    assert not errors
    assert len(seen) >= 5
    for logits in seen:
        assert not logits.requires_grad  # our enable_grad stayed in our thread
        assert torch.equal(logits, expected)  # identical computation: exact
    for s in results:
        assert torch.equal(s, alone)
    assert all(p.grad is None for p in model.parameters())
