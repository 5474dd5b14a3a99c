"""Step-through generation: exact agreement with the source's uncached greedy loop."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gptviz import PRESETS, GPTConfig, GPTModel, Trace
from gptviz.generation.session import DEFAULT_MAX_RETAINED_BYTES, GenerationSession, generate_greedy
from gptviz.tokenizer import ENDOFTEXT_ID

from .conftest import assert_clear_top1

pytestmark = pytest.mark.numeric  # .ci/run runs this file again on another CPU code path

BOOK_IDS = [15496, 11, 314, 716, 27018, 24086, 47843, 30961, 42348, 7267]
BOOK_TEXT = "Hello, I am Featureiman Byeswickattribute argue"


def reference_generate(model, idx, max_new_tokens, context_size, top_k=10):
    """The source's generate_text_simple, uncached; also returns each step's top-k (probs, ids).

    Checks that every greedy choice is clearly separated from the runner-up
    (:func:`conftest.assert_clear_top1`), so tests comparing other code paths' tokens with these
    stay exact on every CPU."""
    tops = []
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]
        assert_clear_top1(logits)
        probas = torch.softmax(logits, dim=-1)
        idx_next = torch.argmax(probas, dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
        tops.append(torch.topk(probas[0], top_k))
    return idx, tops


# --------------------------------------------------------------------------- the seed-124M model


@pytest.fixture(scope="module")
def seed_model() -> GPTModel:
    torch.manual_seed(123)
    return GPTModel(PRESETS["seed-124M"]).eval()


@pytest.fixture(scope="module")
def reference_100(seed_model, enc):
    idx, tops = reference_generate(seed_model, torch.tensor([enc.encode("Hello, I am")]), 100, 1024)
    return idx[0].tolist(), tops


@pytest.fixture(scope="module")
def session_100(seed_model, enc):
    session = GenerationSession(seed_model, enc, "Hello, I am")
    session.step(100)
    return session


def test_book_output(reference_100, session_100, seed_model, enc):
    """The source material's published output for seed 123 (an oracle independent of this code)."""
    assert reference_100[0][:10] == BOOK_IDS
    assert session_100.ids[:10] == BOOK_IDS
    assert enc.decode(session_100.ids[:10]) == BOOK_TEXT
    out = generate_greedy(seed_model, torch.tensor([BOOK_IDS[:4]]), 6, 1024)
    assert out[0].tolist() == BOOK_IDS


def test_generate_greedy_matches_uncached_100_steps(seed_model, reference_100):
    ids = reference_100[0]
    out = generate_greedy(seed_model, torch.tensor([ids[:4]]), 100, 1024)
    assert out[0].tolist() == ids


def test_session_matches_uncached_100_steps(session_100, reference_100):
    ids, tops = reference_100
    assert session_100.ids == ids
    assert session_100.prompt_ids == ids[:4]
    assert session_100.generated_ids == ids[4:]
    assert [r.token_id for r in session_100.steps] == ids[4:]
    assert [r.position for r in session_100.steps] == list(range(4, 104))
    for record, top in zip(session_100.steps, tops):
        assert [c.token_id for c in record.candidates] == top.indices.tolist()
        assert torch.allclose(torch.tensor([c.prob for c in record.candidates]), top.values, rtol=0, atol=1e-5)
        assert len(record.lens) == 12 and [e.layer for e in record.lens] == list(range(12))
        assert record.lens[-1].token_id == record.token_id
        assert record.lens[-1].prob == pytest.approx(record.candidates[0].prob, abs=1e-6)


def test_session_uses_the_cache(session_100):
    steps = session_100.steps
    assert steps[0].positions_computed == 4  # prefill of the prompt
    assert all(r.positions_computed == 1 for r in steps[1:])
    assert [r.cache_tokens for r in steps] == list(range(4, 104))
    assert [r.context_len for r in steps] == list(range(4, 104))
    assert not any(r.cropped for r in steps)
    per_token = 2 * 12 * 768 * 4  # keys + values, 12 layers, fp32
    assert all(r.cache_bytes >= r.cache_tokens * per_token for r in steps)


def test_124m_at_full_context_stays_within_budget(seed_model, enc):
    """The issue's budget: at T=1024 a 124M session retains <= 64 MB beyond the shared model
    (an fp32 KV cache alone would be 2 * 12 * 1024 * 768 * 4 B = 75.5 MB)."""
    prompt = torch.randint(0, 50257, (1020,), generator=torch.Generator().manual_seed(1)).tolist()
    session = GenerationSession(seed_model, enc, prompt)
    records = session.step(4)
    assert len(session.ids) == 1024 and [r.positions_computed for r in records] == [1020, 1, 1, 1]
    assert records[-1].cache_bytes >= 2 * 12 * 1023 * 768 * 4  # kept whole within step(n) ...
    assert session.retained_bytes <= DEFAULT_MAX_RETAINED_BYTES == 64 * 10**6  # ... not after it:
    assert session.cache_tokens == 768  # 896 positions would take 66 MB; chunks of 128
    weights, positions = session.attention(11)
    assert positions == list(range(959, 1023)) and weights.shape == (12, 64, 64)
    assert session.step()[0].positions_computed == 1024 - 768  # only the positions past the prefix
    assert session.retained_bytes <= DEFAULT_MAX_RETAINED_BYTES


# --------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def ctx16_model() -> GPTModel:
    torch.manual_seed(7)
    return GPTModel(GPTConfig(context_length=16, emb_dim=32, n_heads=4, n_layers=3)).eval()


def test_overflowing_context_matches_uncached(ctx16_model, enc):
    prompt = enc.encode("Hello, I am")
    ref, tops = reference_generate(ctx16_model, torch.tensor([prompt]), 50, 16)
    assert generate_greedy(ctx16_model, torch.tensor([prompt]), 50, 16)[0].tolist() == ref[0].tolist()
    session = GenerationSession(ctx16_model, enc, prompt, attn_window=8)
    records = session.step(50)
    assert session.ids == ref[0].tolist()
    for i, (record, top) in enumerate(zip(records, tops)):
        n = len(prompt) + i  # tokens before this step
        assert record.cropped == (n > 16)
        assert record.context_len == min(n, 16)
        assert record.positions_computed == (16 if n > 16 else (n if i == 0 else 1))
        assert torch.allclose(torch.tensor([c.prob for c in record.candidates]), top.values, rtol=0, atol=1e-5)


def test_generate_greedy_batch_and_short_context(ctx16_model):
    idx = torch.tensor([[1, 2, 3, 4, 5], [50, 40, 30, 20, 10]])
    ref, _ = reference_generate(ctx16_model, idx, 20, 8)
    out = generate_greedy(ctx16_model, idx, 20, 8)
    assert out.shape == (2, 25)
    assert torch.equal(out, ref)


def test_prompt_longer_than_context(ctx16_model, enc):
    prompt = list(range(100, 125))  # 25 tokens > context_length 16
    ref, _ = reference_generate(ctx16_model, torch.tensor([prompt]), 5, 16)
    session = GenerationSession(ctx16_model, enc, prompt)
    records = session.step(5)
    assert session.ids == ref[0].tolist()
    assert all(r.cropped and r.context_len == 16 for r in records)


def test_undo_reset(tiny_model, enc):
    session = GenerationSession(tiny_model, enc, "Hello, I am")
    first = session.step(6)
    ids = session.ids
    undone = session.undo()
    assert undone == first[-1]
    assert session.ids == ids[:-1] and len(session.steps) == 5
    again = session.step()[0]
    assert again.token_id == undone.token_id and session.ids == ids
    assert again.positions_computed == 1  # the cache survived the undo
    for _ in range(3):
        session.undo()
    assert session.step(3)[-1].token_id == ids[-1] and session.ids == ids
    session.reset()
    assert session.ids == session.prompt_ids == enc.encode("Hello, I am")
    assert session.steps == [] and session.text == "Hello, I am" and session.generated_text == ""
    with pytest.raises(ValueError, match="nothing to undo"):
        session.undo()
    assert session.step()[0].token_id == first[0].token_id
    assert session.prompt_text + session.generated_text == session.text


def test_iter_steps_streams(tiny_model, enc):
    expected = [r.token_id for r in GenerationSession(tiny_model, enc, "Hello").step(3)]
    session = GenerationSession(tiny_model, enc, "Hello")
    stream = session.iter_steps(3)
    first = next(stream)
    assert len(session.steps) == 1 and session.ids[-1] == first.token_id  # visible before the rest runs
    assert [first.token_id] + [r.token_id for r in stream] == expected
    with pytest.raises(ValueError, match="steps"):
        session.iter_steps(-2)


def test_lens_equals_uncached_logit_lens(tiny_model, enc):
    session = GenerationSession(tiny_model, enc, "The cat sat on the")
    session.step(4)
    record = session.steps[-1]
    trace = Trace(("residual",))
    with torch.no_grad():
        tiny_model(torch.tensor([session.ids[:-1]]), trace=trace)
        probs = torch.softmax(tiny_model.logit_lens(torch.stack([r[0, -1] for r in trace.residuals])), dim=-1)
    top = probs.max(dim=-1)
    assert [e.token_id for e in record.lens] == top.indices.tolist()
    assert torch.allclose(torch.tensor([e.prob for e in record.lens]), top.values, rtol=0, atol=1e-5)
    assert [e.piece for e in record.lens] == [enc.decode([i]) for i in top.indices.tolist()]


def test_predictions_and_lens_of_several_sessions_come_from_one_head_product(tiny_model):
    """predict_with_lens: each final row's logits are the model's own prediction and each kept
    block row's lens answer is its logit lens's top-1, as computed row by row; a session whose
    lens is off (None) gets only its prediction."""
    from gptviz.generation.reads import predict_with_lens

    L, emb = tiny_model.cfg.n_layers, tiny_model.cfg.emb_dim
    torch.manual_seed(5)
    finals = torch.randn(3, emb)
    kept = [torch.randn(L - 1, emb), None, torch.randn(L - 1, emb)]
    logits, answers = predict_with_lens(tiny_model, finals, kept)
    assert answers[1] is None and len(logits) == 3
    with torch.no_grad():
        for i in range(3):
            alone = tiny_model.logit_lens(finals[i : i + 1])[0]  # one row: another kernel than the batch's
            assert logits[i].shape == (tiny_model.cfg.vocab_size,) and logits[i].untyped_storage().nbytes() == alone.nbytes
            torch.testing.assert_close(logits[i], alone, rtol=0, atol=1e-5)  # float32 rounding
            if kept[i] is not None:
                probs = torch.softmax(tiny_model.logit_lens(kept[i]), dim=-1)  # (L - 1, vocab)
                assert_clear_top1(probs.log())
                assert answers[i][0] == probs.argmax(-1).tolist()
                torch.testing.assert_close(torch.tensor(answers[i][1]), probs.max(-1).values, rtol=0, atol=1e-5)


def test_lens_off(tiny_model, enc):
    with_lens = GenerationSession(tiny_model, enc, "Hello").step(3)
    without = GenerationSession(tiny_model, enc, "Hello", logit_lens=False).step(3)
    assert [r.token_id for r in without] == [r.token_id for r in with_lens]
    assert all(r.lens == [] for r in without)


def recomputed_attention(model, ids, start, end, layer):
    trace = Trace(("attn_weights",), layers=[layer])
    with torch.no_grad():
        model(torch.tensor([ids[start:end]]), trace=trace)
    return trace.attentions[0][0]  # (n_heads, T, T)


@pytest.fixture(scope="module")
def ctx16_reference(ctx16_model):
    prompt = [464, 3797, 3332, 319]
    return reference_generate(ctx16_model, torch.tensor([prompt]), 72, 16)[0][0].tolist()  # 6 actions × 12 steps


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    actions=st.lists(
        st.one_of(
            st.tuples(st.just("step"), st.integers(1, 12)),
            st.tuples(st.just("undo"), st.integers(1, 25)),
            st.tuples(st.just("reset"), st.just(0)),
        ),
        max_size=6,
    ),
    window=st.integers(1, 20),
    layer=st.integers(0, 2),
)
def test_attention_window_equals_recomputed(ctx16_model, ctx16_reference, enc, actions, window, layer):
    """Any sequence of steps, undos (also past the kept rows) and resets: the windowed attention is
    the last block of the full recomputed attention, and the tokens are the uncached ones."""
    session = GenerationSession(ctx16_model, enc, ctx16_reference[:4], attn_window=8)
    for action, n in actions:
        if action == "step":
            session.step(n)
        elif action == "undo":
            for _ in range(min(n, len(session.steps))):
                session.undo()
        else:
            session.reset()
        assert session.ids == ctx16_reference[: len(session.ids)]
    start, end = session.context_span
    assert end == len(session.ids) - (1 if session.steps else 0) and start == max(0, end - 16)
    full = recomputed_attention(ctx16_model, session.ids, start, end, layer)
    weights, positions = session.attention(layer, window)
    w = min(window, end - start)
    assert positions == list(range(end - w, end))
    expected = full[:, -w:, -w:]
    assert weights.shape == expected.shape
    assert torch.allclose(weights, expected, rtol=0, atol=1e-5)
    whole, whole_positions = session.full_attention(layer)
    assert whole_positions == list(range(start, end))
    assert torch.allclose(whole, full, rtol=0, atol=1e-5)
    assert torch.allclose(whole.sum(-1), torch.ones(whole.shape[:2]), atol=1e-5)


def test_attention_at_prompt_then_step_reuses_it(tiny_model, enc):
    session = GenerationSession(tiny_model, enc, "Hello, I am")
    weights, positions = session.attention(0)
    assert positions == [0, 1, 2, 3] and weights.shape == (4, 4, 4)
    assert session.step()[0].positions_computed == 1  # the prompt was read for the attention view
    assert session.attention(0)[1] == [0, 1, 2, 3]  # what the step read
    assert torch.allclose(session.attention(0)[0], weights, atol=1e-6)


def test_retained_bytes_budget(tiny_model, enc):
    prompt = enc.encode("Hello, I am")
    ref, _ = reference_generate(tiny_model, torch.tensor([prompt]), 42, 64)
    free = GenerationSession(tiny_model, enc, prompt, attn_window=8, max_retained_bytes=None)
    free.step(40)
    assert free.cache_bytes >= 43 * 2 * 2 * 32 * 4  # keys + values, 2 layers, emb 32, fp32
    budget = free.retained_bytes - free.cache_bytes // 2  # the cache no longer fits at 40 steps
    session = GenerationSession(tiny_model, enc, prompt, attn_window=8, max_retained_bytes=budget)
    records = session.step(40)
    assert all(r.positions_computed == 1 for r in records[1:])  # the cache is kept within one step(n) ...
    assert session.cache_tokens == 0 and session.retained_bytes <= budget  # ... and dropped after it
    assert session.step()[0].positions_computed == 44  # the next step re-reads the context
    assert session.retained_bytes <= budget
    for action in (session.undo, lambda: session.attention(1), session.step, session.reset):
        action()
        assert session.retained_bytes <= budget
        if session.steps:
            assert session.ids == ref[0, : len(session.ids)].tolist()
    assert free.retained_bytes > budget


def test_cache_shrinks_to_a_prefix_within_budget(enc):
    torch.manual_seed(3)
    model = GPTModel(GPTConfig(context_length=512, emb_dim=32, n_heads=4, n_layers=2)).eval()
    prompt = enc.encode("Hello, I am")
    free = GenerationSession(model, enc, prompt, max_retained_bytes=None)
    free.step(140)
    per_position = 2 * 2 * 32 * 4  # keys + values, 2 layers, emb 32, fp32
    budget = free.retained_bytes - free.cache_bytes + 140 * per_position  # room for 140 positions
    session = GenerationSession(model, enc, prompt, max_retained_bytes=budget)
    session.step(140)
    assert session.cache_tokens == 128 and session.retained_bytes <= budget  # whole chunks of 128
    computed = [session.step()[0].positions_computed for _ in range(4)]
    assert computed[0] == len(prompt) + 140 - 128
    assert session.ids == free.ids + [r.token_id for r in free.step(4)]
    assert session.retained_bytes <= budget


def test_sessions_are_independent(tiny_model, enc):
    alone_a = GenerationSession(tiny_model, enc, "Hello, I am").step(8)
    alone_b = GenerationSession(tiny_model, enc, "Every effort moves").step(8)
    a = GenerationSession(tiny_model, enc, "Hello, I am")
    b = GenerationSession(tiny_model, enc, "Every effort moves")
    for _ in range(4):
        a.step(2)
        b.step()
        b.undo()
        b.step(2)
    assert [r.token_id for r in a.steps] == [r.token_id for r in alone_a]
    assert [r.token_id for r in b.steps] == [r.token_id for r in alone_b]
    probs = [c.prob for c in b.steps[-1].candidates]
    assert probs == pytest.approx([c.prob for c in alone_b[-1].candidates], abs=1e-6)
    assert not tiny_model.training


def test_training_mode_is_refused(tiny_cfg, enc):
    model = GPTModel(tiny_cfg)  # nn.Module starts in training mode
    with pytest.raises(ValueError, match="eval"):
        GenerationSession(model, enc, "Hi")
    with pytest.raises(ValueError, match="eval"):
        generate_greedy(model, torch.tensor([[1, 2]]), 1, 8)
    assert model.training  # never switched by generation


def test_sampling_is_seeded_and_top1_is_greedy(tiny_model, enc):
    greedy = [r.token_id for r in GenerationSession(tiny_model, enc, "Hello").step(6)]
    top1 = GenerationSession(tiny_model, enc, "Hello", temperature=1.5, sample_top_k=1).step(6)
    assert [r.token_id for r in top1] == greedy and all(r.sampled for r in top1)
    a = GenerationSession(tiny_model, enc, "Hello", temperature=2.0, seed=5)
    b = GenerationSession(tiny_model, enc, "Hello", temperature=2.0, seed=5)
    tokens = [r.token_id for r in a.step(8)]
    assert [r.token_id for r in b.step(8)] == tokens
    assert tokens != greedy  # flat random-weight distributions at temperature 2
    a.undo()
    assert a.step()[0].token_id == tokens[-1]


def test_stop_at_eos(tiny_cfg, enc):
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg).eval()
    with torch.no_grad():  # make <|endoftext|> the top prediction everywhere
        model.final_norm.scale.zero_()
        model.final_norm.shift.fill_(1.0)
        model.out_head.weight[ENDOFTEXT_ID] = 1.0
    session = GenerationSession(model, enc, "Hello", stop_at_eos=True)
    records = session.step(5)
    assert [r.token_id for r in records] == [ENDOFTEXT_ID] and session.finished
    assert session.step() == []
    assert GenerationSession(model, enc, "Hello").step(3)[-1].token_id == ENDOFTEXT_ID  # off by default


def test_invalid_input(tiny_model, enc):
    with pytest.raises(ValueError, match="empty"):
        GenerationSession(tiny_model, enc, "")
    with pytest.raises(ValueError, match="vocabulary"):
        GenerationSession(tiny_model, enc, [1, 60000])
    session = GenerationSession(tiny_model, enc, "Hello")
    with pytest.raises(ValueError, match="layer"):
        session.attention(2)
    with pytest.raises(ValueError, match="steps"):
        session.step(-1)
    assert session.step(0) == []


# --------------------------------------------------------------------------- sampling controls

from gptviz.generation.sampling import sampling_distribution  # noqa: E402


def reference_distribution(logits: list[float], temperature: float, top_k, top_p):
    """Written from the definitions with Python floats, independently of sampling_distribution:
    top-k keeps logits >= the k-th largest; softmax(logit / temperature) over those; top-p keeps the
    smallest number n of the most probable with mass >= top_p. Returns (probs after top-k and
    temperature, top-k allowed mask, n, the prefix sums of the sorted probabilities)."""
    v = len(logits)
    allowed = [True] * v
    if top_k is not None and top_k < v:
        kth = sorted(logits, reverse=True)[top_k - 1]
        allowed = [x >= kth for x in logits]
    m = max(logits)
    e = [math.exp((x - m) / temperature) if a else 0.0 for x, a in zip(logits, allowed)]
    probs = [x / sum(e) for x in e]
    ranked = sorted((p for p, a in zip(probs, allowed) if a), reverse=True)
    prefix, total = [], 0.0
    for p in ranked:
        total += p
        prefix.append(total)
    if top_p is None or top_p >= 1:
        n = sum(allowed)
    else:
        n = next((k + 1 for k, s in enumerate(prefix) if s >= top_p), len(ranked))
    return probs, allowed, n, prefix


@settings(max_examples=150, deadline=None)
@given(
    logits=st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=1, max_size=40),
    temperature=st.floats(0.05, 5.0),
    top_k=st.one_of(st.none(), st.integers(1, 45)),
    top_p=st.one_of(st.none(), st.floats(1e-9, 1.0)),
    data=st.data(),
)
def test_sampling_distribution_is_the_smallest_nucleus(logits, temperature, top_k, top_p, data):
    v = len(logits)
    top_k = None if top_k is None else min(top_k, v)
    probs, kept = sampling_distribution(torch.tensor(logits), temperature, top_k, top_p)
    ref_probs, allowed, n, prefix = reference_distribution(logits, temperature, top_k, top_p)
    # A top_p within rounding of a prefix sum could fall either side: not a meaningful case.
    assume(top_p is None or all(abs(s - top_p) > 1e-9 for s in prefix))
    assert probs.shape == kept.shape == (v,) and kept.dtype == torch.bool
    k = kept.tolist()
    assert all(a for a, kk in zip(allowed, k) if kk)  # the nucleus is inside the top-k
    assert sum(k) == n  # the smallest set with mass >= top_p ...
    in_p = [p for p, kk in zip(ref_probs, k) if kk]
    out_p = [p for p, kk, a in zip(ref_probs, k, allowed) if a and not kk]
    assert not out_p or min(in_p) >= max(out_p)  # ... made of the most probable tokens
    assert max(in_p) == max(ref_probs)  # a most probable token is always kept (of tied ones, either)
    assert (probs[~kept] == 0).all() and (probs >= 0).all()
    # float64 on both sides, only the summation order differs: 1e-12
    assert float(probs[kept].sum()) == pytest.approx(1.0, abs=1e-12)
    expected = torch.tensor([p if kk else 0.0 for p, kk in zip(ref_probs, k)], dtype=torch.float64)
    torch.testing.assert_close(probs, expected / expected.sum(), atol=1e-12, rtol=1e-9)


@settings(max_examples=40, deadline=None)
@given(logits=st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=1, max_size=30),
       top_k=st.one_of(st.none(), st.integers(1, 30)), top_p=st.one_of(st.none(), st.floats(1e-9, 1.0)))
def test_sampling_distribution_temperature_zero_is_the_argmax(logits, top_k, top_p):
    x = torch.tensor(logits)
    top = sorted(set(logits), reverse=True)[:2]  # the largest value and the next smaller one
    # argmax(softmax(x)), the source's rule, can tie logits closer than float32 softmax resolves: exclude those
    # (equal maxima stay: the first of them wins; a value 1e-38 below them ties in softmax too)
    assume(len(top) == 1 or top[0] - top[1] > 1e-4)
    probs, kept = sampling_distribution(x, 0.0, top_k, top_p)
    first_max = logits.index(max(logits))  # argmax: the first of equal maxima
    assert kept.tolist() == [i == first_max for i in range(len(logits))]
    assert probs.tolist() == [float(i == first_max) for i in range(len(logits))]


def test_sampling_distribution_batched_and_tie_order():
    # equal probabilities at the boundary: the lower ids go first (a stable descending sort)
    probs, kept = sampling_distribution(torch.zeros(6), 1.0, top_p=0.4)  # 1/6 each: 3 tokens hold 0.5 >= 0.4
    assert kept.tolist() == [True, True, True, False, False, False]
    torch.testing.assert_close(probs, torch.tensor([1 / 3] * 3 + [0.0] * 3, dtype=torch.float64), atol=1e-15, rtol=0)
    rows = torch.randn(3, 5000, generator=torch.Generator().manual_seed(0)) * 3
    batch = sampling_distribution(rows, 0.7, 300, 0.8)
    for r in range(3):  # rows of a batch are independent
        one = sampling_distribution(rows[r], 0.7, 300, 0.8)
        assert torch.equal(batch[1][r], one[1])
        torch.testing.assert_close(batch[0][r], one[0], atol=1e-15, rtol=0)
    # a flat distribution whose nucleus is beyond the first 2048 tokens (the full-sort path)
    probs, kept = sampling_distribution(torch.zeros(10_000), 1.0, top_p=0.50005)  # between 5000 and 5001 tokens
    assert int(kept.sum()) == 5001 and kept[:5001].all()


def test_sampling_distribution_validation():
    x = torch.randn(10)
    for kwargs, match in [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=1.0, top_k=0), "top_k"),
        (dict(temperature=1.0, top_k=2.5), "top_k"),
        (dict(temperature=1.0, top_p=0.0), "top_p"),
        (dict(temperature=1.0, top_p=1.5), "top_p"),
        (dict(temperature=1.0, top_p=True), "top_p"),
    ]:
        with pytest.raises(ValueError, match=match):
            sampling_distribution(x, **kwargs)


def greedy_tokens(model, enc, prompt, n):
    return [r.token_id for r in GenerationSession(model, enc, prompt).step(n)]


def test_temperature_zero_tiny_top_p_and_top_k_1_are_greedy(tiny_model, enc):
    greedy = greedy_tokens(tiny_model, enc, "Hello, I am", 8)
    zero = GenerationSession(tiny_model, enc, "Hello, I am", temperature=0.0, sample_top_k=3, top_p=0.5).step(8)
    assert [r.token_id for r in zero] == greedy and not any(r.sampled for r in zero)
    assert all(r.n_kept == 1 and r.sample_prob == 1.0 for r in zero)
    nucleus = GenerationSession(tiny_model, enc, "Hello, I am", temperature=1.0, top_p=1e-9, seed=4).step(8)
    assert [r.token_id for r in nucleus] == greedy and all(r.sampled and r.n_kept == 1 for r in nucleus)
    top1 = GenerationSession(tiny_model, enc, "Hello, I am", temperature=3.0, seed=4)
    top1.set_sampling(sample_top_k=1)
    assert [r.token_id for r in top1.step(8)] == greedy


def test_sampling_is_reproducible_and_seed_dependent(tiny_model, enc):
    settings_ = dict(temperature=1.0, sample_top_k=500, top_p=0.95)
    a = [r.token_id for r in GenerationSession(tiny_model, enc, "Hello", seed=1, **settings_).step(20)]
    b = [r.token_id for r in GenerationSession(tiny_model, enc, "Hello", seed=1, **settings_).step(20)]
    c = [r.token_id for r in GenerationSession(tiny_model, enc, "Hello", seed=2, **settings_).step(20)]
    assert a == b
    assert a != c  # a random-weight model's flat distributions: 20 draws from ~470 tokens each
    session = GenerationSession(tiny_model, enc, "Hello", seed=1, **settings_)
    session.step(20)
    for _ in range(5):
        session.undo()
    assert [r.token_id for r in session.step(5)] == a[-5:]  # undo + step repeats the draws


def test_settings_change_mid_session_and_replay(tiny_model, enc):
    session = GenerationSession(tiny_model, enc, "Every effort moves", temperature=1.5, seed=1)
    plan = [
        (dict(), 3),
        (dict(top_p=0.8), 3),
        (dict(temperature=0.0), 2),
        (dict(temperature=0.7, sample_top_k=20, seed=9), 3),
        (dict(top_p=None, sample_top_k=None), 2),
    ]
    expected_settings = []
    current = dict(temperature=1.5, sample_top_k=None, top_p=None, seed=1)
    for change, n in plan:
        session.set_sampling(**change)
        current = {**current, **change}
        assert session.sampling == current
        session.step(n)
        expected_settings += [dict(current)] * n
    records = session.steps
    assert [dict(temperature=r.temperature, sample_top_k=r.sample_top_k, top_p=r.top_p, seed=r.seed)
            for r in records] == expected_settings
    assert [r.sampled for r in records] == [s["temperature"] > 0 for s in expected_settings]
    replay = GenerationSession(tiny_model, enc, "Every effort moves")  # a lesson file replaying the records
    for r in records:
        replay.set_sampling(temperature=r.temperature, sample_top_k=r.sample_top_k, top_p=r.top_p, seed=r.seed)
        assert replay.step()[0].token_id == r.token_id
    for r in records:
        chosen = [c for c in r.candidates if c.token_id == r.token_id]
        if chosen:  # the chosen token's probabilities agree between the record and its candidate
            assert chosen[0].sample_prob == r.sample_prob and chosen[0].kept
        assert 0 < r.sample_prob <= 1 and r.n_kept >= 1


def test_set_sampling_validation_changes_nothing(tiny_model, enc):
    session = GenerationSession(tiny_model, enc, "Hello", temperature=0.5, top_p=0.9)
    before = session.sampling
    for kwargs, match in [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=2.0, top_p=0.0), "top_p"),  # a valid temperature does not get through either
        (dict(sample_top_k=0), "sample_top_k"),
        (dict(sample_top_k=60000), "sample_top_k"),
        (dict(seed=1.5), "seed"),
        (dict(seed=True), "seed"),
    ]:
        with pytest.raises(ValueError, match=match):
            session.set_sampling(**kwargs)
        assert session.sampling == before
    with pytest.raises(TypeError):
        session.set_sampling(top_q=0.3)
    for kwargs, match in [(dict(top_p=0), "top_p"), (dict(top_p=2), "top_p"), (dict(temperature=float("nan")),
                                                                                 "temperature"),
                          (dict(sample_top_k=0), "sample_top_k"), (dict(seed="1"), "seed")]:
        with pytest.raises(ValueError, match=match):
            GenerationSession(tiny_model, enc, "Hello", **kwargs)


def count_reads(monkeypatch, session):
    calls = []
    real = session._read
    monkeypatch.setattr(session, "_read", lambda end: calls.append(end) or real(end))
    return calls


def test_next_distribution_is_what_the_step_draws_from(tiny_model, enc, monkeypatch):
    session = GenerationSession(tiny_model, enc, "Hello, I am", temperature=1.0, sample_top_k=3, seed=3)
    reads = count_reads(monkeypatch, session)
    before = session.retained_bytes
    nd = session.next_distribution(5)
    assert reads == [4] and nd.position == 4 and not nd.greedy
    assert session.retained_bytes >= before + 50257 * 4  # the kept next-step logits are accounted
    plain = [c.prob for c in nd.candidates]
    assert plain == sorted(plain, reverse=True) and len(plain) == 5
    assert [c.kept for c in nd.candidates] == [True, True, True, False, False] and nd.n_kept == 3
    # at temperature 1, top-3 sampling renormalises the plain probabilities of the top 3
    torch.testing.assert_close(torch.tensor([c.sample_prob for c in nd.candidates]),
                               torch.tensor([p / sum(plain[:3]) for p in plain[:3]] + [0.0, 0.0]),
                               atol=1e-6, rtol=1e-5)  # float32 softmax vs float64: ~1e-7
    assert nd.kept_mass == pytest.approx(sum(plain[:3]), abs=1e-6)
    session.set_sampling(sample_top_k=None, top_p=1e-9)
    nd2 = session.next_distribution(5)
    assert reads == [4]  # settings changed: no model work
    assert [c.token_id for c in nd2.candidates] == [c.token_id for c in nd.candidates]
    assert [c.kept for c in nd2.candidates] == [True, False, False, False, False] and nd2.n_kept == 1
    session.set_sampling(sample_top_k=3, top_p=None)
    nd = session.next_distribution()
    record = session.step()[0]
    assert reads == [4]  # the step used the kept read
    assert record.positions_computed == 4
    assert [(c.token_id, c.prob, c.sample_prob, c.kept) for c in record.candidates] == [
        (c.token_id, c.prob, c.sample_prob, c.kept) for c in nd.candidates]
    assert record.token_id in [c.token_id for c in nd.candidates[:3]]
    # the same tokens as a session that never looked ahead
    plain_session = GenerationSession(tiny_model, enc, "Hello, I am", temperature=1.0, sample_top_k=3, seed=3)
    assert plain_session.step()[0] == dataclasses.replace(record, ms=plain_session.steps[0].ms)
    session.next_distribution()
    assert reads == [4, 5]  # one position for the next step
    assert session.step()[0].positions_computed == 1 and reads == [4, 5]


def test_next_distribution_greedy_and_after_undo(tiny_model, enc):
    reference = greedy_tokens(tiny_model, enc, "Hello, I am", 4)
    session = GenerationSession(tiny_model, enc, "Hello, I am")
    nd = session.next_distribution(3)
    assert nd.greedy and nd.n_kept == 1 and nd.candidates[0].token_id == reference[0]
    assert [(c.sample_prob, c.kept) for c in nd.candidates] == [(1.0, True), (0.0, False), (0.0, False)]
    assert nd.kept_mass == pytest.approx(nd.candidates[0].prob, abs=1e-7)
    session.step(3)
    session.next_distribution()
    session.undo()  # the kept read is for a position that no longer comes next
    assert session.next_distribution().position == 6
    assert [r.token_id for r in session.step(2)] == reference[2:4]
    with pytest.raises(ValueError, match="k must"):
        session.next_distribution(0)


def test_values_equal_the_recomputed_values(ctx16_model, enc):
    """From the KV cache (the context fits) and by a forward pass (cropped context)."""
    for prompt, steps in ((list(range(300, 306)), 4), (list(range(300, 330)), 2)):
        session = GenerationSession(ctx16_model, enc, prompt, attn_window=8)
        session.step(steps)
        start, end = session.context_span
        trace = Trace(("values",), layers=[2])
        with torch.no_grad():
            ctx16_model(torch.tensor([session.ids[start:end]]), trace=trace)
        expected = trace.get("values")[0][0]  # (n_heads, T, head_dim)
        values, positions = session.values(2, window=5)
        assert positions == list(range(end - 5, end)) and values.shape == (4, 5, 8)
        # cached single-position kernels vs one full forward: ~1e-6 in float32
        torch.testing.assert_close(values, expected[:, -5:], atol=1e-5, rtol=1e-5)
        assert session.values(2)[1] == session.attention(2)[1]  # the same window as attention()
