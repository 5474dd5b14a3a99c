"""Batched steps: several sessions' next steps in one forward of the shared model
(:func:`step_together`), and the logit lens of many rows in one product with the output head
(:func:`lens_top1`).

:mod:`gptviz.generation` re-exports both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .kv_cache import BatchKVCache
from .model import GPTModel
from .session_reads import _require_eval
from .trace import Trace

if TYPE_CHECKING:
    from .generation import GenerationSession, StepRecord

__all__ = ["lens_top1", "step_together"]


def lens_top1(model: GPTModel, residuals: torch.Tensor) -> tuple[list[int], list[float]]:
    """Top-1 id and probability of the logit lens ``out_head(final_norm(x))`` for each row of
    ``(n, emb)``: one product with the output head for all rows (the head is the largest matrix
    of the model; reading it once for every block, and every visitor of a batch, is the point)."""
    with torch.inference_mode():
        logits = model.logit_lens(residuals).float()  # (n, vocab): one product with the head for all rows
        top = logits.max(dim=-1)
        probs = torch.exp(top.values - torch.logsumexp(logits, dim=-1))  # softmax at the top-1
    return top.indices.tolist(), probs.tolist()


def step_together(sessions: list[GenerationSession]) -> list[StepRecord]:
    """One step of each session, their model reads batched into one forward (NEW: serving many
    visitors; the weights are read once for all of them instead of once each).

    Every session must be :attr:`~GenerationSession.batchable` and share one model. Each gets
    the record its own ``step()`` would give: the same token choice, logits equal to float32
    tolerance (one batched matrix product instead of one per visitor), its own attention rows,
    lens and cache.
    """
    if not sessions:
        return []
    model = sessions[0].model
    if any(s.model is not model or not s.batchable for s in sessions):
        raise ValueError("step_together needs batchable sessions of one model")
    _require_eval(model)
    ends = [len(s._ids) for s in sessions]
    ids = torch.tensor([[s._ids[e - 1]] for s, e in zip(sessions, ends)], device=model.device)  # (b, 1)
    positions = torch.tensor([[e - 1] for e in ends], device=model.device)  # (b, 1)
    lens = any(s.logit_lens for s in sessions)
    trace = Trace(("attn_weights", "residual") if lens else ("attn_weights",))
    cache = BatchKVCache([s._cache for s in sessions])
    with torch.inference_mode():
        logits = model(ids, cache, trace=trace, last_only=True, positions=positions)[:, -1]  # (b, vocab)
        kept = []
        for i, (s, end) in enumerate(zip(sessions, ends)):
            attentions = [att[i : i + 1, ..., :end] for att in trace.attentions]  # (1, n_heads, 1, end): its own keys
            kept.append(s._absorb(end, end - 1, 0, s._cache, attentions, [r[i : i + 1] for r in trace.residuals]))
        rows = [r for r in kept if r is not None]
        if rows:  # every visitor's lens in one product with the head
            ids_all, probs_all = lens_top1(model, torch.cat(rows))
            n = rows[0].shape[0]
            answers = iter((ids_all[j : j + n], probs_all[j : j + n]) for j in range(0, len(ids_all), n))
            kept = [next(answers) if r is not None else None for r in kept]
    for i, (s, end) in enumerate(zip(sessions, ends)):
        s._pending = (end, logits[i], kept[i], 1)
    return [s.step(1)[0] for s in sessions]
