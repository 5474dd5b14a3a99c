"""Batched steps across visitors: one forward for several sessions gives each its solo result."""

from __future__ import annotations

import threading

import pytest
import torch

from gptviz import GPTConfig, GPTModel, KVCache
from gptviz.generation.batching import next_reads_together, read_together, step_together
from gptviz.generation.session import GenerationSession
from gptviz.kv_cache import BatchKVCache
from gptviz.ui.serving import StepBatcher, Turns

from .conftest import assert_clear_top1, count_forwards

pytestmark = pytest.mark.numeric

PROMPTS = ["Hello, I am", "Once upon a time there was", "The", "1 2 3 4 5 6 7 8 9", "def main():"]


def solo_runs(model, enc, steps):
    runs = []
    for p in PROMPTS:
        s = GenerationSession(model, enc, p)
        s.step(steps)
        runs.append(s)
    return runs


def assert_as_alone(a, b, n_layers):
    """Session ``b`` (batched) holds what ``a`` (alone) holds: the same tokens and candidates, lens,
    attention and cache, to float32 tolerance (one batched product instead of one per session)."""
    assert a.ids == b.ids
    for ra, rb in zip(a.steps, b.steps):
        assert [c.token_id for c in ra.candidates] == [c.token_id for c in rb.candidates]
        torch.testing.assert_close(torch.tensor([c.prob for c in rb.candidates]),
                                   torch.tensor([c.prob for c in ra.candidates]), atol=1e-6, rtol=1e-4)
        assert [e.token_id for e in ra.lens] == [e.token_id for e in rb.lens]
        torch.testing.assert_close(torch.tensor([e.prob for e in rb.lens]), torch.tensor([e.prob for e in ra.lens]),
                                   atol=1e-6, rtol=1e-4)
    assert_same_attention(a, b, n_layers)
    assert b.cache_tokens == a.cache_tokens


def assert_same_attention(a, b, n_layers):
    for layer in range(n_layers):
        wa, pa = a.attention(layer)
        wb, pb = b.attention(layer)
        assert pa == pb
        torch.testing.assert_close(wb, wa, atol=1e-6, rtol=0)  # attention weights in [0, 1], float32


def test_batched_forward_over_caches_of_different_lengths_equals_each_row_alone(tiny_model):
    rows = [torch.randint(0, 50257, (1, n)) for n in (3, 9, 1, 14)]
    caches = [KVCache.for_config(tiny_model.cfg) for _ in rows]
    with torch.no_grad():
        for r, c in zip(rows, caches):
            if r.shape[1] > 1:
                tiny_model(r[:, :-1], c)  # each visitor's earlier positions, cached
        expected = [tiny_model(r)[:, -1] for r in rows]  # each row alone, uncached
        batch = BatchKVCache(caches)
        new = torch.cat([r[:, -1:] for r in rows])  # (4, 1)
        positions = torch.tensor([[r.shape[1] - 1] for r in rows])
        out = tiny_model(new, batch, positions=positions, last_only=True)[:, -1]
    for i, e in enumerate(expected):
        # Not bit-exact: one (4, emb) product against four (1, emb) ones. float32 logits of size ~1:
        # 1e-5 is the cached-vs-uncached bound used throughout.
        torch.testing.assert_close(out[i : i + 1], e, atol=1e-5, rtol=0)
    assert [c.length for c in caches] == [r.shape[1] for r in rows]  # each cache grew by its one position


def test_step_together_gives_every_session_its_solo_tokens_and_numbers(tiny_model, enc):
    solo = solo_runs(tiny_model, enc, 12)
    for s in solo:  # token equality below is exact: make sure no choice is a near-tie
        with torch.no_grad():
            assert_clear_top1(tiny_model(torch.tensor([s.ids[:-1]]))[0, len(s.prompt_ids) - 1:])
    together = [GenerationSession(tiny_model, enc, p) for p in PROMPTS]
    for s in together:
        s.step(1)  # the prefill runs alone
    for _ in range(11):
        assert all(s.batchable for s in together)
        step_together(together)
    for a, b in zip(solo, together):
        assert_as_alone(a, b, tiny_model.cfg.n_layers)


def test_reads_made_ahead_together_are_what_each_step_then_uses_without_a_forward(tiny_model, enc, monkeypatch):
    solo = solo_runs(tiny_model, enc, 8)  # alone; their choices are clear (the step_together test checks)
    ahead = [GenerationSession(tiny_model, enc, p) for p in PROMPTS]
    for s in ahead:
        s.step(1)  # the prefill runs alone
    calls = count_forwards(monkeypatch, tiny_model)
    for _ in range(7):
        next_reads_together(ahead)
        assert calls[0] == 1 and not any(s.batchable for s in ahead)  # one forward for all; each read kept
        assert all(s.retained_bytes <= s.max_retained_bytes for s in ahead)  # the kept reads are in the budget
        for s in ahead:
            s.step(1)
        assert calls[0] == 1  # the steps ran no forward of their own
        calls[0] = 0
    for a, b in zip(solo, ahead):
        assert_as_alone(a, b, tiny_model.cfg.n_layers)
    ahead[0].undo()  # an Undo drops a kept read: the next step reads again
    next_reads_together(ahead[1:2])
    ahead[1].undo()
    assert ahead[0].step(1)[0].token_id == solo[0].ids[-1] and ahead[1].step(1)[0].token_id == solo[1].ids[-1]


def test_read_together_reads_fresh_prompts_of_different_lengths_as_each_alone(tiny_model, enc):
    solo = solo_runs(tiny_model, enc, 6)
    together = [GenerationSession(tiny_model, enc, p) for p in PROMPTS]
    assert len({len(s.prompt_ids) for s in together}) > 1  # right padding is exercised
    assert all(s.fresh for s in together)
    read_together(together)
    assert not any(s.fresh for s in together)
    for p, s in zip(PROMPTS, together):  # the prompt is read: its cache and attention rows are kept
        assert s.cache_tokens == len(s.prompt_ids)
        assert_same_attention(GenerationSession(tiny_model, enc, p), s, tiny_model.cfg.n_layers)  # its own read
    for a, b in zip(solo, together):
        records = b.step(6)
        assert records[0].positions_computed == len(b.prompt_ids)  # reported as the prefill it was
        assert [r.positions_computed for r in records[1:]] == [1] * 5
        assert_as_alone(a, b, tiny_model.cfg.n_layers)  # one (b·T, emb) product against one per prompt


def test_a_view_read_then_batched_steps_match_solo_steps(tiny_model, enc):
    """After Reset's view, read_together(keep_logits=False) keeps rows and cache: the next step
    reads the last position again, batched, and says it computed 1 position, as alone."""
    solo = []
    for p in PROMPTS:
        s = GenerationSession(tiny_model, enc, p)
        s.attention(0)  # the view's own read of the prompt
        s.step(4)
        solo.append(s)
    together = [GenerationSession(tiny_model, enc, p) for p in PROMPTS]
    read_together(together, keep_logits=False)
    assert all(s.batchable for s in together)  # cache and rows hold the whole prompt: re-read its last position
    for _ in range(4):
        step_together(together)
    for a, b in zip(solo, together):
        assert [r.positions_computed for r in b.steps] == [r.positions_computed for r in a.steps] == [1] * 4
        assert_as_alone(a, b, tiny_model.cfg.n_layers)


def test_read_together_refuses_what_it_cannot_batch(tiny_model, enc):
    read = GenerationSession(tiny_model, enc, "Hello")
    read.step(1)
    assert not read.fresh
    with pytest.raises(ValueError, match="fresh"):
        read_together([read])
    long = GenerationSession(tiny_model, enc, list(range(1, tiny_model.cfg.context_length + 1)), attn_window=8)
    assert not long.fresh  # longer than the attention window: its read is chunked, alone
    other = GenerationSession(GPTModel(tiny_model.cfg).eval(), enc, "Hello")
    with pytest.raises(ValueError, match="one model"):
        read_together([GenerationSession(tiny_model, enc, "Hello"), other])
    read_together([])


def test_step_together_refuses_what_it_cannot_batch(tiny_model, enc):
    fresh = GenerationSession(tiny_model, enc, "Hello")  # no cache yet: its first step is a prefill
    assert not fresh.batchable
    with pytest.raises(ValueError, match="batchable"):
        step_together([fresh])
    other = GenerationSession(GPTModel(tiny_model.cfg).eval(), enc, "Hello")
    warm = GenerationSession(tiny_model, enc, "Hello")
    warm.step(1)
    other.step(1)
    with pytest.raises(ValueError, match="one model"):
        step_together([warm, other])
    assert step_together([]) == []


def test_the_batcher_serves_concurrent_steps_in_batches_with_solo_results(tiny_model, enc):
    solo = solo_runs(tiny_model, enc, 8)
    batcher = StepBatcher(Turns())
    sessions = [GenerationSession(tiny_model, enc, p) for p in PROMPTS]
    start, errors = threading.Barrier(len(sessions)), []

    def visitor(s):
        try:
            start.wait()
            for _ in range(8):
                batcher.step(s)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=visitor, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [s.ids for s in sessions] == [s.ids for s in solo]
    assert max(batcher.batches) > 1  # steps that arrived together ran together
    assert sum(batcher.batches) == len(sessions) * 8  # every step, the prefills too (batched), each exactly once


def test_the_batcher_draws_each_view_right_after_its_step_in_the_same_turn(tiny_model, enc):
    """``then`` (drawing a visitor's view) runs in the model's turn, after that visitor's step, and
    its value or error goes back to that visitor only."""
    turns = Turns()
    batcher = StepBatcher(turns)
    sessions = [GenerationSession(tiny_model, enc, p) for p in PROMPTS]
    start, seen, errors, got = threading.Barrier(len(sessions)), [], [], {}

    def view(k, s, n):
        seen.append((k, len(s.steps) == n, turns.locked() and turns.mine()))
        if k == 2 and n == 3:
            raise RuntimeError("drawing failed")
        return (k, n)

    def visitor(k, s):
        start.wait()
        for n in range(1, 6):
            try:
                got[(k, n)] = batcher.step(s, lambda: view(k, s, n))
            except RuntimeError as e:
                errors.append((k, n, str(e)))

    threads = [threading.Thread(target=visitor, args=(k, s)) for k, s in enumerate(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [(2, 3, "drawing failed")]
    assert got == {(k, n): (k, n) for k in range(len(sessions)) for n in range(1, 6) if (k, n) != (2, 3)}
    assert len(seen) == 5 * len(sessions) and all(after and in_turn for _, after, in_turn in seen)
    assert max(batcher.batches) > 1  # drawn by a batch's leader too, not only by steps that ran alone
