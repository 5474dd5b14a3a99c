"""Batched steps: several sessions' next steps in one forward of the shared model
(:func:`step_together`), or only their reads, kept for the steps (:func:`next_reads_together`);
several fresh sessions' prompts read in one forward (:func:`read_together`). Every visitor's
prediction and logit lens come from one product with the output head
(:func:`~gptviz.generation.reads.predict_with_lens`).

"""

from __future__ import annotations

import torch

from ..kv_cache import BatchKVCache, KVCache
from ..model import GPTModel
from ..trace import Trace
from .reads import _require_eval, predict_with_lens
from .session import GenerationSession, StepRecord

__all__ = ["next_reads_together", "read_together", "step_together"]


def next_reads_together(sessions: list[GenerationSession]) -> None:
    """The next step's read of each session — one new position through its kept cache — in one
    batched forward (NEW: serving many visitors; the weights are read once for all of them
    instead of once each), kept for its step: each session's next ``step()`` then runs no forward.

    Every session must be :attr:`~GenerationSession.batchable` and share one model. Each keeps
    what its own read would keep: its attention rows, lens and cache, and logits equal to
    float32 tolerance (one batched matrix product instead of one per visitor).
    """
    _next_reads(sessions)
    for s in sessions:
        s._enforce_budget()  # after every public action


def _next_reads(sessions: list[GenerationSession]) -> None:
    if not sessions:
        return
    model = sessions[0].model
    if any(s.model is not model or not s.batchable for s in sessions):
        raise ValueError("batched reads need batchable sessions of one model")
    _require_eval(model)
    ends = [len(s._ids) for s in sessions]
    for s, end in zip(sessions, ends):
        s._cache.truncate(end - 1)  # the position this step reads (cached already by a read of the context: again)
    ids = torch.tensor([[s._ids[e - 1]] for s, e in zip(sessions, ends)], device=model.device)  # (b, 1)
    positions = torch.tensor([[e - 1] for e in ends], device=model.device)  # (b, 1)
    lens = any(s.logit_lens for s in sessions)
    trace = Trace(("attn_weights", "residual") if lens else ("attn_weights",))
    cache = BatchKVCache([s._cache for s in sessions])
    with torch.inference_mode():
        finals = model(ids, cache, trace=trace, last_only=True, positions=positions, head=False)[:, -1]  # (b, emb)
        kept = []
        for i, (s, end) in enumerate(zip(sessions, ends)):
            attentions = [att[i : i + 1, ..., :end] for att in trace.attentions]  # (1, n_heads, 1, end): its own keys
            kept.append(s._absorb(end, end - 1, 0, s._cache, attentions, [r[i : i + 1] for r in trace.residuals]))
        logits, answers = predict_with_lens(model, finals, kept)
    for s, end, logit, lens_answers in zip(sessions, ends, logits, answers):
        s._pending = (end, logit, lens_answers, 1)


def step_together(sessions: list[GenerationSession]) -> list[StepRecord]:
    """One step of each session, their model reads batched into one forward
    (:func:`next_reads_together`). Each gets the record its own ``step()`` would give: the same
    token choice, logits equal to float32 tolerance, its own attention rows, lens and cache."""
    _next_reads(sessions)
    return [s.step(1)[0] for s in sessions]


def read_together(sessions: list[GenerationSession], keep_logits: bool = True) -> None:
    """The first read of each fresh session — its whole prompt — in one forward (NEW: serving
    many visitors; a class that opens the page together prefills together).

    Every session must be :attr:`~GenerationSession.fresh` and share one model. The prompts are
    right-padded to the longest: causal attention keeps each row's real positions from seeing
    the padding after them, and each cache is cut back to its own prompt. Each session then holds
    what its own first read would hold — the attention rows, the KV cache, and the next step's
    logits (equal to float32 tolerance: one batched product instead of one per visitor) with its
    lens — so its next step runs no forward. ``keep_logits=False``: only the rows and the cache, as
    a view's read keeps them (the next step then reads the last position again, batched).
    """
    if not sessions:
        return
    model = sessions[0].model
    if any(s.model is not model or not s.fresh for s in sessions):
        raise ValueError("read_together needs fresh sessions of one model")
    _require_eval(model)
    ends = [len(s._ids) for s in sessions]
    longest = max(ends)
    ids = torch.tensor([s._ids + [0] * (longest - e) for s, e in zip(sessions, ends)], device=model.device)  # (b, T)
    last = torch.tensor([e - 1 for e in ends], device=model.device)  # (b,) each row's last real position
    lens = any(s.logit_lens for s in sessions)
    trace = Trace(("attn_weights", "residual") if lens else ("attn_weights",))
    caches = [KVCache.for_config(model.cfg) for _ in sessions]
    with torch.inference_mode():
        finals = model(ids, BatchKVCache(caches), trace=trace, last_only=last, head=False)[:, -1]  # (b, emb)
        kept = []
        for i, (s, end, cache) in enumerate(zip(sessions, ends, caches)):
            cache.truncate(end)  # the padding's keys and values go
            attentions = [att[i : i + 1, :, :end, :end] for att in trace.attentions]  # (1, n_heads, end, end)
            kept.append(s._absorb(end, 0, 0, cache, attentions, [r[i : i + 1, :end] for r in trace.residuals]))
        if keep_logits:  # the next step's read: every visitor's prediction and lens in one product
            for s, end, logit, lens_answers in zip(sessions, ends, *predict_with_lens(model, finals, kept)):
                s._pending = (end, logit, lens_answers, end)
