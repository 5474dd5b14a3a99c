"""Tests of gptviz.analysis.inside: shape tracer, head ablation, precision comparison, KV-cache view."""

from __future__ import annotations

import collections
import copy
import re
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import gptviz.model
from gptviz import GPTConfig, GPTModel, KVCache
from gptviz.analysis.inside import ablate, ablate_in_slices, cache_savings, compare_precision, compare_precisions_in_slices, finish, forward_flops, kv_cache_table, low_precision_copy, model_source, next_logits_in_slices, parse_heads, trace_shapes

pytestmark = pytest.mark.numeric  # .ci/run runs this file again on another CPU code path

FILE_LINES = Path(gptviz.model.__file__).read_text().splitlines()


@pytest.fixture(scope="module")
def ids(enc) -> list[int]:
    return enc.encode("Hello, I am a model")


def normal_logits(model: GPTModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]), last_only=True)[0, -1]


def shapes(tensors) -> str:
    return "; ".join(str(tuple(t.shape)) for t in tensors if isinstance(t, torch.Tensor))


# --------------------------------------------------------------------------- shape tracer


def hooked_calls(model: GPTModel, ids: list[int]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Independently observed module calls: names in the order they are entered, and
    (name, input shapes, output shape) of each call."""
    names = {m: n or type(m).__name__ for n, m in model.named_modules()}
    entered, calls = [], []
    handles = [m.register_forward_pre_hook(lambda m, a: entered.append(names[m])) for m in names]
    handles += [m.register_forward_hook(lambda m, a, o: calls.append((names[m], shapes(a), shapes([o])))) for m in names]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return entered, calls


def test_traced_shapes_equal_what_forward_hooks_observe(tiny_model, tiny_cfg, ids):
    table = trace_shapes(tiny_model, ids)
    modules = table[table["kind"] != "traced tensor"]
    entered, calls = hooked_calls(tiny_model, ids)
    assert list(modules["module"]) == entered  # forward order
    assert collections.Counter(zip(modules["module"], modules["input"], modules["output"])) == collections.Counter(calls)
    T, H, hd, V, E = len(ids), tiny_cfg.n_heads, tiny_cfg.head_dim, tiny_cfg.vocab_size, tiny_cfg.emb_dim
    row = table.set_index("module")
    assert (row.loc["tok_emb", "input"], row.loc["tok_emb", "output"]) == (str((1, T)), str((1, T, E)))
    assert row.loc["out_head", "output"] == str((1, T, V))
    assert row.loc["trf_blocks.1.att:queries", "output"] == str((1, H, T, hd))
    assert row.loc["trf_blocks.0.att:attn_scores", "output"] == str((1, H, T, T))
    assert row.loc["trf_blocks.0.att:context", "output"] == str((1, T, H, hd))
    assert row.loc["trf_blocks.0.ff.layers.0", "output"] == str((1, T, 4 * E))


def test_traced_tensors_match_the_models_trace(tiny_model, tiny_cfg, ids):
    trace = gptviz.model.Trace(names=None)
    with torch.no_grad():
        tiny_model(torch.tensor([ids]), trace=trace)
    table = trace_shapes(tiny_model, ids)
    traced = table[table["kind"] == "traced tensor"]
    expected = {
        f"trf_blocks.{layer}.att:{name}": str(tuple(t.shape)) for (layer, name), t in trace.tensors.items()
        if name not in ("residual", "resid_mid", "ff_out")  # block-level streams: not attention rows
    }
    assert dict(zip(traced["module"], traced["output"])) == expected
    assert len(traced) == len(expected) == 6 * tiny_cfg.n_layers


def test_hooks_are_removed_and_results_unchanged(tiny_model, ids):
    before = normal_logits(tiny_model, ids)
    trace_shapes(tiny_model, ids)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny_model.modules())
    assert torch.equal(normal_logits(tiny_model, ids), before)


def test_other_threads_forward_passes_are_not_recorded(tiny_model, ids):
    solo = trace_shapes(tiny_model, ids)
    other_ids = ids[:3]
    stop, ready, mismatches, runs = threading.Event(), threading.Event(), [], [0]

    def other_user():
        # The expectation is computed in this thread, before any tracing starts: the comparison is
        # then exact (the same call, the same thread and thread pool), and any difference would
        # come from the tracer's hooks touching this thread's forward pass.
        expected = normal_logits(tiny_model, other_ids)
        ready.set()
        while not stop.is_set():
            runs[0] += 1
            if not torch.equal(normal_logits(tiny_model, other_ids), expected):
                mismatches.append(runs[0])

    worker = threading.Thread(target=other_user)
    worker.start()
    ready.wait(30)
    try:
        tables = [trace_shapes(tiny_model, ids) for _ in range(5)]
    finally:
        stop.set()
        worker.join()
    assert runs[0] > 0 and not mismatches
    for table in tables:
        assert table.equals(solo)


def test_source_lines_point_at_the_code_that_made_each_shape(tiny_model, ids):
    table = trace_shapes(tiny_model, ids)
    for module, kind, line, code in zip(table["module"], table["kind"], table["line"], table["code"]):
        text = FILE_LINES[line - 1]
        assert text.strip() == code
        last = module.replace(":", ".").split(".")[-1]
        if module == "GPTModel":
            assert "def forward" in text
        elif kind == "traced tensor":
            # The line that made the tensor: it assigns the variable that the model's record call
            # right after it (record(NAME, var), same block) hands to the trace.
            produced = {
                "queries": "queries = queries.view(",
                "keys": "keys = keys.view(",
                "values": "values = values.view(",
                "attn_scores": "attn_scores = queries @ keys",
                "attn_weights": "attn_weights = self.dropout(attn_weights)",
                "context": "(attn_weights @ values)",
            }
            assert produced[last] in text
        elif module.startswith("trf_blocks.") and last.isdigit() and module.count(".") == 1:
            assert "block(" in text
        elif last.isdigit():  # children of the feed-forward Sequential
            assert "self.layers(" in text
        else:
            assert f"self.{last}(" in text
    shortcut_lines = table.loc[table["module"] == "trf_blocks.0.drop_shortcut", "line"].tolist()
    assert len(shortcut_lines) == 2 and shortcut_lines[0] < shortcut_lines[1]  # two different call sites


def test_model_source_matches_the_file():
    text, first = model_source()
    assert first == 1 and text.splitlines() == FILE_LINES
    text, first = model_source(gptviz.model.MultiHeadAttention)
    lines = text.splitlines()
    assert lines[0].startswith("class MultiHeadAttention")
    assert lines == FILE_LINES[first - 1 : first - 1 + len(lines)]


def test_collapse_keeps_block_zero_and_summarises_the_rest(tiny_cfg, ids):
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg.replace(n_layers=3)).eval()
    full = trace_shapes(model, ids)
    collapsed = trace_shapes(model, ids, collapse=True)
    per_block = full["module"].str.match(r"trf_blocks\.0[.:]|trf_blocks\.0$").sum()
    assert len(collapsed) == len(full) - 2 * per_block + 1
    assert not collapsed["module"].str.match(r"trf_blocks\.[12][.:]").any()
    summary = collapsed[collapsed["module"] == "trf_blocks.1 … trf_blocks.2"]
    assert len(summary) == 1 and summary["kind"].iloc[0].endswith("×2")
    block0 = full[full["module"].str.match(r"trf_blocks\.0")]
    assert block0.reset_index(drop=True).equals(
        collapsed[collapsed["module"].str.match(r"trf_blocks\.0")].reset_index(drop=True)
    )
    assert list(collapsed["module"].iloc[-2:]) == ["final_norm", "out_head"]


# --------------------------------------------------------------------------- head ablation


def test_ablating_no_head_equals_the_normal_run_exactly(tiny_model, tiny_cfg, ids):
    expected = normal_logits(tiny_model, ids)
    for heads in ("", set(), torch.ones(tiny_cfg.n_layers, tiny_cfg.n_heads)):
        result = ablate(tiny_model, ids, heads)
        # Exact: the same last_only forward on the same shapes; a mask of ones multiplies by 1.0.
        assert torch.equal(result.ablated_logits, expected)
        assert torch.equal(result.logits, expected)
        assert result.max_logit_change == 0 and not result.top1_changed and result.heads == ()
    with torch.no_grad():
        full = tiny_model(torch.tensor([ids]))[0, -1]
    assert torch.allclose(result.logits, full, atol=1e-5)


@pytest.mark.parametrize("layer", [0, 1])
def test_ablating_every_head_of_a_layer_removes_its_attention_output(tiny_model, tiny_cfg, ids, layer):
    # Expectation built independently: the layer's attention sub-block replaced by what is
    # left when no head contributes, out_proj's bias.
    patched = copy.deepcopy(tiny_model)
    att = patched.trf_blocks[layer].att
    att.forward = lambda x, *args, **kwargs: att.out_proj.bias.expand_as(x)
    expected = normal_logits(patched, ids)

    result = ablate(tiny_model, ids, f"{layer}.*", top_k=5)
    assert result.heads == tuple((layer, h) for h in range(tiny_cfg.n_heads))
    assert torch.allclose(result.ablated_logits, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(result.ablated_logits, result.logits, atol=1e-3)
    assert result.max_logit_change == pytest.approx((expected - result.logits).abs().max().item(), abs=1e-5)
    one_head = ablate(tiny_model, ids, [(layer, 0)])
    assert not torch.allclose(one_head.ablated_logits, expected, atol=1e-6)


def test_ablation_table_is_side_by_side_top_k(tiny_model, ids):
    result = ablate(tiny_model, ids, "L0H1, 1.2", top_k=7)
    table = result.table
    assert len(table) == 7 and list(table["rank"]) == list(range(1, 8))
    p, q = torch.softmax(result.logits, -1), torch.softmax(result.ablated_logits, -1)
    assert list(table["a_id"]) == p.topk(7).indices.tolist()  # a = the normal run
    assert list(table["b_id"]) == q.topk(7).indices.tolist()  # b = the ablated run
    assert table["b_p"].tolist() == pytest.approx(q.topk(7).values.tolist())
    assert table["b_p_same"].tolist() == pytest.approx(q[p.topk(7).indices].tolist())
    assert result.top1_changed == (table["a_id"][0] != table["b_id"][0])
    assert result.heads == ((0, 1), (1, 2))


def test_ablation_never_modifies_the_shared_model(tiny_model, ids):
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    ablate(tiny_model, ids, "0.*, 1.*")
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in state.items())


def test_parse_heads_reads_the_documented_forms():
    assert parse_heads("0.3, 5.1", 12, 12) == {(0, 3), (5, 1)}
    assert parse_heads("L0H3 l5h1;2:0", 12, 12) == {(0, 3), (5, 1), (2, 0)}
    assert parse_heads("4.*", 12, 12) == {(4, h) for h in range(12)}
    assert parse_heads("L1H*", 2, 3) == {(1, 0), (1, 1), (1, 2)}
    assert parse_heads("  ", 12, 12) == frozenset()
    assert parse_heads([(1, 2)], 12, 12) == {(1, 2)}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("12.0", r"12 layers \(0 … 11\)"),
        ("L0H12", r"12 heads \(0 … 11\)"),
        ("3.5.1", "cannot read head"),
        ("head 3", "cannot read head"),
        ([(0, 1.5)], "pair of integers"),
        ([(-1, 0)], "12 layers"),
    ],
)
def test_parse_heads_rejects_bad_input_naming_the_limit(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_heads(spec, 12, 12)


@given(st.data())
def test_parse_heads_round_trips_any_head_set(data):
    n_layers, n_heads = data.draw(st.integers(1, 48)), data.draw(st.integers(1, 25))
    heads = data.draw(st.sets(st.tuples(st.integers(0, n_layers - 1), st.integers(0, n_heads - 1)), max_size=20))
    assert parse_heads(", ".join(f"{l}.{h}" for l, h in heads), n_layers, n_heads) == heads
    assert parse_heads(" ".join(f"L{l}H{h}" for l, h in heads), n_layers, n_heads) == heads


def test_bad_head_mask_and_training_mode_are_rejected(tiny_model, tiny_cfg, ids):
    with pytest.raises(ValueError, match=rf"\({tiny_cfg.n_layers}, {tiny_cfg.n_heads}\)"):
        ablate(tiny_model, ids, torch.ones(3, 3))
    training = copy.deepcopy(tiny_model).train()
    with pytest.raises(ValueError, match="model.eval"):
        ablate(training, ids, "")


# --------------------------------------------------------------------------- precision


def test_precision_fp32_side_is_the_normal_run_and_bf16_differs_a_little(tiny_model, ids):
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    expected = normal_logits(tiny_model, ids)
    result = compare_precision(tiny_model, ids, top_k=5, repeats=2)
    assert torch.equal(result.logits, expected)  # exact: the same call on the same model and shapes
    assert tiny_model.dtype == torch.float32
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in state.items())

    low = copy.deepcopy(tiny_model).to(torch.bfloat16)
    independent = normal_logits(low, ids).float()
    assert torch.equal(result.low_logits, independent)  # exact: the same bfloat16 call, same shapes
    assert result.max_abs_diff == (independent - expected).abs().max().item()
    assert 0 < result.max_abs_diff < 0.05 * expected.abs().max().item()
    top = set(expected.topk(5).indices.tolist()), set(independent.topk(5).indices.tolist())
    assert result.topk_agree == (top[0] == top[1]) and result.topk_overlap == len(top[0] & top[1])
    assert result.top1_agree == (expected.argmax() == independent.argmax())
    assert result.ms_reference > 0 and result.ms_low > 0
    assert result.dtype == torch.bfloat16 and list(result.table["a_id"]) == expected.topk(5).indices.tolist()


def test_precision_accepts_a_cached_low_precision_model(tiny_model, ids):
    low = low_precision_copy(tiny_model, torch.float16)
    assert low.dtype == torch.float16 and tiny_model.dtype == torch.float32
    result = compare_precision(tiny_model, ids, low_model=low, repeats=1)
    assert result.dtype == torch.float16
    assert torch.equal(result.low_logits, normal_logits(low, ids).float())
    assert list(result.table["b_id"]) == normal_logits(low, ids).float().topk(10).indices.tolist()


# --------------------------------------------------------------------------- KV cache


def test_kv_cache_table_bytes_match_the_tensors(tiny_model, tiny_cfg, ids):
    cache = KVCache.for_config(tiny_model.cfg, chunk=4)
    empty = kv_cache_table(cache)
    assert len(empty) == tiny_cfg.n_layers and (empty["allocated bytes"] == 0).all()
    with torch.no_grad():
        tiny_model(torch.tensor([ids[:5]]), cache)
        tiny_model(torch.tensor([ids[5:6]]), cache)
    table = kv_cache_table(cache)
    assert list(table["layer"]) == list(range(tiny_cfg.n_layers))
    for row, layer in zip(table.itertuples(index=False), cache.layers):
        k, v = layer.k[:, :, :6], layer.v[:, :, :6]
        assert row[1] == row[2] == str((1, tiny_cfg.n_heads, 6, tiny_cfg.head_dim))
        assert row[3] == str((1, tiny_cfg.n_heads, 8, tiny_cfg.head_dim))  # two chunks of 4
        assert row[4] == k.nelement() * k.element_size() + v.nelement() * v.element_size()
        assert row[5] == layer.k.nelement() * layer.k.element_size() + layer.v.nelement() * layer.v.element_size()
    assert table["filled bytes"].sum() == cache.used_bytes
    assert table["allocated bytes"].sum() == cache.nbytes


@settings(max_examples=12, deadline=None)
@given(
    n_heads=st.integers(1, 3),
    head_dim=st.integers(2, 4),
    n_layers=st.integers(1, 3),
    vocab=st.integers(2, 40),
    qkv_bias=st.booleans(),
    T=st.integers(1, 12),
    data=st.data(),
)
def test_cache_savings_counts_the_flops_the_model_really_runs(n_heads, head_dim, n_layers, vocab, qkv_bias, T, data):
    new = data.draw(st.integers(1, T))
    cfg = GPTConfig(
        vocab_size=vocab, context_length=16, emb_dim=n_heads * head_dim, n_heads=n_heads, n_layers=n_layers, qkv_bias=qkv_bias
    )
    model = GPTModel(cfg).eval()
    ids = torch.randint(0, vocab, (1, T))
    savings = cache_savings(cfg, T, new)

    def counted(run) -> int:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            run()
        return counter.get_total_flops()

    cache = KVCache.for_config(model.cfg)
    if new < T:
        with torch.no_grad():
            model(ids[:, : T - new], cache)  # prefill the earlier positions
    assert savings.flops_cached == counted(lambda: model(ids[:, T - new :], cache, last_only=True))
    assert savings.flops_full == counted(lambda: model(ids, last_only=True))
    assert (savings.positions_cached, savings.positions_full) == (new, T)
    assert savings.saving >= 1 and (savings.saving == 1) == (new == T)


def test_cache_savings_for_the_124m_shape_and_bad_arguments():
    cfg = GPTConfig()
    s = cache_savings(cfg, 512)
    d, L, V = 768, 12, 50257
    assert s.flops_cached == 24 * d * d * L + 4 * d * L * 512 + 2 * V * d
    assert s.flops_full == forward_flops(cfg, 512, 512) > 300 * s.flops_cached
    assert (s.positions_cached, s.positions_full, s.context_len) == (1, 512, 512)
    for bad in ((0, 1), (4, 5), (2000, 1), (4, 0)):
        with pytest.raises(ValueError, match="context_length \\(1024\\)"):
            cache_savings(cfg, *bad)


def test_ids_are_one_sequence_cropped_to_the_context(tiny_model, tiny_cfg):
    long_ids = list(range(tiny_cfg.context_length + 10))
    table = trace_shapes(tiny_model, torch.tensor([long_ids]))
    assert table.set_index("module").loc["tok_emb", "input"] == str((1, tiny_cfg.context_length))
    result = ablate(tiny_model, long_ids, "")
    # Exact: ablation crops to the same last context_length ids and runs the same call.
    assert torch.equal(result.logits, normal_logits(tiny_model, long_ids[-tiny_cfg.context_length :]))
    for bad, message in (([], "no tokens"), (torch.zeros(2, 3, dtype=torch.long), "one sequence")):
        with pytest.raises(ValueError, match=message):
            ablate(tiny_model, bad, "")


# --------------------------------------------------------------------------- sliced work


def test_sliced_analyses_pause_between_slices_and_agree_with_one_pass(tiny_model, tiny_cfg):
    ids = list(range(100, 150))  # 50 tokens: 4 slices of 16 (13 + 3 pauses per forward)
    one_pass = ablate(tiny_model, ids, "0.1, 1.*")
    work = ablate_in_slices(tiny_model, ids, "0.1, 1.*", slice_len=16)
    pauses = 0
    while True:
        try:
            assert next(work) == 16  # each pause reports the positions its slice ran
            pauses += 1
        except StopIteration as done:
            sliced = done.value
            break
    assert pauses == 2 * 3  # two forwards (normal, ablated), each pausing after 3 of its 4 slices
    # Not bit-exact: sliced runs go through a KV cache (other matrix shapes). float32 logits of
    # this size agree to a few ulps; 1e-5 absolute is the cached-vs-uncached bound used throughout.
    torch.testing.assert_close(sliced.logits, one_pass.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(sliced.ablated_logits, one_pass.ablated_logits, atol=1e-5, rtol=0)
    assert sliced.heads == one_pass.heads
    nothing_off = finish(ablate_in_slices(tiny_model, ids, "", slice_len=16))
    assert torch.equal(nothing_off.logits, nothing_off.ablated_logits)  # exact: both runs are computed the same way


def _drain(work):
    """The slice lengths sliced work reports, and its result."""
    lengths = []
    while True:
        try:
            lengths.append(next(work))
        except StopIteration as done:
            return lengths, done.value


def test_adaptive_slices_follow_the_time_budget_and_paired_runs_slice_alike(tiny_model):
    ids = list(range(100, 160))  # 60 tokens
    # A budget no slice can meet: after the first slice of 8, every slice is 1 position.
    lengths, r = _drain(ablate_in_slices(tiny_model, ids, "", slice_len=8, slice_seconds=1e-12))
    half = len(lengths) // 2
    assert lengths[:half] == lengths[half:]  # the ablated run follows the normal run's slices
    assert lengths[0] == 8 and set(lengths[1:half]) == {1} and sum(lengths[:half]) == 59
    assert torch.equal(r.logits, r.ablated_logits)  # so with no head off both are equal exactly
    # A budget every slice beats: the second slice grows past the 58 positions left, which then
    # run as the final slice.
    batch = torch.tensor([ids])
    lengths, logits = _drain(next_logits_in_slices(tiny_model, batch, slice_len=2, slice_seconds=1e9))
    assert lengths == [2]
    torch.testing.assert_close(logits, normal_logits(tiny_model, ids), atol=1e-5, rtol=0)


def test_sliced_precision_compares_several_copies_against_one_reference(tiny_model):
    ids = list(range(200, 240))
    lows = [low_precision_copy(tiny_model, torch.bfloat16), low_precision_copy(tiny_model, torch.float16)]
    results = finish(compare_precisions_in_slices(tiny_model, ids, lows, top_k=5, repeats=1, slice_len=16))
    assert [r.dtype for r in results] == [torch.bfloat16, torch.float16]
    assert torch.equal(results[0].logits, results[1].logits)  # one reference run, shared
    expected = normal_logits(tiny_model, ids)
    torch.testing.assert_close(results[0].logits, expected, atol=1e-5, rtol=0)  # sliced vs one pass, float32
    for r, low in zip(results, lows):
        # A half-precision copy: ~3 (bf16) or ~4 (fp16) significant digits of logits of size ~1.
        torch.testing.assert_close(r.low_logits, normal_logits(low, ids).float(), atol=0.05, rtol=0.05)
        assert r.ms_reference > 0 and r.ms_low > 0
