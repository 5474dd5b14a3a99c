"""Sampling: the distribution a step draws from, after temperature, top-k and top-p.

Temperature 0 is the source's greedy argmax (the default); temperature > 0 draws from
``softmax(logits / temperature)`` restricted to the top-k logits, then to the top-p nucleus of
what is left (:func:`sampling_distribution`). :class:`~gptviz.generation.session.GenerationSession`
draws from exactly the distribution that function returns, so a chart of it shows what is drawn.

:mod:`gptviz.generation.session` re-exports :func:`sampling_distribution`.
"""

from __future__ import annotations

import math

import torch

__all__ = ["sampling_distribution"]

#: The ranges the app offers (its sliders, its links): temperature 0 (greedy) … 2, top-k 0 (off)
#: … 200, top-p 0.01 … 1 (1 = off). The library itself accepts any valid value.
TEMPERATURE_MAX, TOP_K_MAX, TOP_P_MIN = 2.0, 200, 0.01


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None, vocab_size: int | None = None) -> None:
    """ValueError unless ``temperature`` is a finite number >= 0, ``top_k`` None or an int in
    1 … vocab_size, ``top_p`` None or a number with 0 < top_p <= 1."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None:
        upper = f" and vocab_size={vocab_size}" if vocab_size is not None else ""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1 or (vocab_size and top_k > vocab_size):
            raise ValueError(f"sample_top_k must be None or an integer between 1{upper}, got {top_k!r}")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be None or a number with 0 < top_p <= 1, got {top_p!r}")


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The top-p set of ``probs`` ``(..., vocab)``: the n most probable tokens, n the smallest with
    mass >= top_p; among tokens tied at the boundary the lowest ids go first (the order of a
    stable descending sort). Looks at the top 256, then 2048 values only, if they hold top_p:
    a peaked distribution needs no sort of the whole vocabulary."""
    vocab = probs.shape[-1]
    for m in (256, 2048, vocab):  # a full sort of GPT-2's vocabulary costs ~20 ms, topk(2048) ~1 ms
        m = min(m, vocab)
        vals = (torch.topk(probs, m, dim=-1) if m < vocab else torch.sort(probs, dim=-1, descending=True)).values
        cum = torch.cumsum(vals, dim=-1)  # (..., m) the mass of the top 1, 2, … tokens
        if m == vocab or bool((cum[..., -1] >= top_p).all()):
            break
    n = ((cum - vals) < top_p).sum(dim=-1, keepdim=True)  # (..., 1): tokens whose predecessors hold < top_p
    boundary = vals.gather(-1, n - 1)  # (..., 1) the probability of the n-th token
    above = probs > boundary
    tied = probs == boundary
    room = n - above.sum(dim=-1, keepdim=True)  # boundary ties that still fit, taken in id order
    return above | (tied & (torch.cumsum(tied, dim=-1) <= room))


def sampling_distribution(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The distribution a sampler draws from, after temperature and the cut-offs.

    ``logits``: ``(..., vocab)``. Returns ``(probs, kept)``, both ``(..., vocab)``: ``probs``
    (float64; float32 on devices without float64) sums to 1 over the vocabulary and is exactly 0
    outside ``kept`` (bool), the tokens that may be drawn. The order, per row:

    * ``temperature == 0``: greedy, the source's ``argmax(softmax(logits))`` (the first of equal
      maxima): ``kept`` is that one token, ``probs`` is 1 there. ``top_k``/``top_p`` are ignored.
    * **top-k** (``top_k``): keep the logits ``>=`` the k-th largest (the source's chapter-5 rule:
      ties with the k-th are kept, so more than k may survive ties).
    * **temperature**: ``softmax(logits / temperature)`` over what is kept.
    * **top-p** (``top_p``, on that renormalised distribution): keep the smallest set of the most
      probable tokens whose probabilities sum to ``>= top_p``: a token is kept when the tokens
      ranked above it hold less than ``top_p`` (so the top-1 always is); equal probabilities
      rank by token id. ``top_p = 1`` or None keeps everything; the result is renormalised.

    Temperature does not change which tokens top-k keeps, but it does change the nucleus.
    Computed in float64, so the cumulative sums of 50,257 probabilities are exact to ~1e-13.
    """
    _check_sampling(temperature, top_k, top_p)
    if logits.shape[-1] == 0:
        raise ValueError("logits must have at least one entry on the last dimension")
    dtype = torch.float32 if logits.device.type == "mps" else torch.float64
    x = logits.to(dtype)  # (..., vocab)
    if temperature == 0:
        greedy = torch.softmax(logits.float(), dim=-1).argmax(dim=-1, keepdim=True)  # (..., 1)
        kept = torch.zeros(x.shape, dtype=torch.bool, device=x.device).scatter_(-1, greedy, True)
        return kept.to(dtype), kept
    kept = torch.ones(x.shape, dtype=torch.bool, device=x.device)
    if top_k is not None and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]  # (..., 1)
        kept = x >= kth
    # Subtract the max before dividing, so a tiny temperature gives -inf (prob 0), never inf - inf.
    scaled = ((x - x.max(dim=-1, keepdim=True).values) / temperature).masked_fill(~kept, -torch.inf)
    probs = torch.softmax(scaled, dim=-1)  # (..., vocab)
    if top_p is not None and top_p < 1:
        kept = kept & _nucleus(probs, top_p)
        probs = probs.masked_fill(~kept, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs, kept


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
