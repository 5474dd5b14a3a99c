"""Step-through generation: the source's greedy loop, one token at a time, with a KV cache.

The source's ``generate_text_simple`` repeats: crop the ids to the last ``context_size``
tokens, run the model, take the last position's logits, softmax, argmax, append.
:func:`generate_greedy` keeps that contract and output but feeds the model only the new
token while the context fits (:class:`~gptviz.model.KVCache`); once the ids overflow the
context, positions shift, so every overflowing step recomputes the cropped context, as
the source does.

:class:`GenerationSession` is one visitor's step-through state. Each step records what
the model weighed (:class:`StepRecord`): the top-k candidates, the logit lens of every
layer, and the attention rows of the positions read. How the session reads the model and what
it keeps (KV cache, attention rows, the memory budget) is in :mod:`gptviz.generation.reads`, its
base class.

Sampling (:func:`~gptviz.generation.sampling.sampling_distribution`, in :mod:`gptviz.generation.sampling`): temperature 0
is the source's greedy argmax (the default); temperature > 0 draws from the distribution that
function returns. The settings can change between steps (:meth:`GenerationSession.set_sampling`)
and every :class:`StepRecord` carries the settings it used, so a recorded session can be
replayed token for token. Several sessions' steps run as one batched forward with
:func:`~gptviz.generation.batching.step_together` (:mod:`gptviz.generation.batching`, which imports this module).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import tiktoken
import torch

from ..kv_cache import KVCache
from ..model import GPTModel
from ..tokenizer import ENDOFTEXT_ID, encode, token_piece
from .reads import SessionReads, _deep_size, _require_eval
from .sampling import _check_sampling, _check_seed, sampling_distribution

__all__ = [
    "Candidate",
    "LensEntry",
    "StepRecord",
    "NextDistribution",
    "GenerationSession",
    "generate_greedy",
    "DEFAULT_MAX_RETAINED_BYTES",
]

#: Retained per-session state allowed after an action: the issue's 64 MB (10**6 bytes each, the stricter reading).
DEFAULT_MAX_RETAINED_BYTES = 64 * 10**6


@dataclass(frozen=True, slots=True)
class Candidate:
    token_id: int
    piece: str  # display text of the token (gptviz.tokenizer.token_piece(...).text)
    prob: float  # softmax over the full vocabulary
    sample_prob: float | None = None  # probability in the distribution drawn from (temperature, top-k, top-p)
    kept: bool | None = None  # the sampler may draw it (inside the top-k / top-p cut-offs; greedy: the argmax only)


@dataclass(frozen=True, slots=True)
class LensEntry:
    layer: int  # 0 .. n_layers-1: after block `layer`
    token_id: int  # top-1 of out_head(final_norm(residual)) at the last position
    piece: str
    prob: float


@dataclass(frozen=True, slots=True)
class StepRecord:
    token_id: int  # the chosen (greedy: argmax) token
    piece: str
    candidates: list[Candidate]  # top-k, highest first
    lens: list[LensEntry]  # one per layer; the last equals the model's own prediction ([] if lens is off)
    cropped: bool  # the context was cropped to the last context_length tokens for this step
    context_len: int  # tokens the model saw for this step
    positions_computed: int  # positions run through the model (1 with a warm KV cache, T on a prefill)
    cache_tokens: int  # positions in the KV cache after the step
    cache_bytes: int  # bytes held by the KV cache after the step
    ms: float  # wall time of the step
    position: int = 0  # index of the new token in the session's ids
    sampled: bool = False  # chosen by sampling (temperature > 0), not argmax
    # The sampling settings this step used (GenerationSession.set_sampling(**) replays them):
    temperature: float = 0.0  # 0 = greedy
    sample_top_k: int | None = None  # None: no top-k cut-off
    top_p: float | None = None  # None: no nucleus cut-off
    seed: int = 123  # the draw depends only on (seed, position)
    sample_prob: float = 1.0  # probability of token_id in the distribution drawn from (greedy: 1)
    n_kept: int = 1  # tokens the sampler could draw at this step (greedy: 1)


@dataclass(frozen=True, slots=True)
class NextDistribution:
    """What the next step will draw from (:meth:`GenerationSession.next_distribution`)."""

    position: int  # index the next token will get in the session's ids
    candidates: list[Candidate]  # the k most probable tokens (plain softmax), highest first
    n_kept: int  # tokens the sampler may draw (greedy: 1)
    kept_mass: float  # plain softmax probability of those tokens together
    greedy: bool  # temperature 0: the argmax is taken, nothing is drawn


#: "Leave this setting as it is" in :meth:`GenerationSession.set_sampling` (None means "off").
_KEEP = object()



class GenerationSession(SessionReads):
    """One visitor's generation state (no global mutable state).

    ``GenerationSession(model, enc, prompt)`` with ``prompt`` a str (encoded with
    :func:`gptviz.tokenizer.encode`) or a list of ids. The model is shared read-only and
    must be in eval mode. Options: ``top_k`` candidates per step; ``attn_window`` positions
    of attention kept for display; ``logit_lens`` on/off; ``max_retained_bytes`` (None: no
    limit); sampling instead of argmax with ``temperature > 0``, optionally restricted to
    the ``sample_top_k`` most probable tokens and then to the ``top_p`` nucleus (see
    :func:`sampling_distribution`; :meth:`set_sampling` changes them between steps). The
    draw for a position depends only on ``seed``, the position and the distribution, so the
    same prompt, settings and seed give the same tokens and undo + step repeats a draw.
    ``stop_at_eos`` stops stepping after ``<|endoftext|>``.
    Not thread-safe: run one action at a time per session.
    """

    def __init__(
        self,
        model: GPTModel,
        enc: tiktoken.Encoding,
        prompt: str | list[int],
        *,
        top_k: int = 10,
        attn_window: int = 64,
        logit_lens: bool = True,
        max_retained_bytes: int | None = DEFAULT_MAX_RETAINED_BYTES,
        temperature: float = 0.0,
        sample_top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 123,
        stop_at_eos: bool = False,
    ) -> None:
        _require_eval(model)
        cfg = model.cfg
        ids = encode(prompt, enc) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
        if bad:
            raise ValueError(f"token id(s) {bad[:5]} outside the model's vocabulary (0 … {cfg.vocab_size - 1})")
        if not 1 <= top_k <= cfg.vocab_size:
            raise ValueError(f"top_k must be between 1 and vocab_size={cfg.vocab_size}, got {top_k}")
        if attn_window < 1:
            raise ValueError(f"attn_window must be at least 1, got {attn_window}")
        _check_sampling(temperature, sample_top_k, top_p, cfg.vocab_size)
        _check_seed(seed)
        self.model, self.enc = model, enc
        self.top_k, self.logit_lens = top_k, logit_lens
        self.attn_window = min(attn_window, cfg.context_length)
        self.max_retained_bytes = max_retained_bytes
        self.temperature, self.sample_top_k, self.top_p, self.seed = temperature, sample_top_k, top_p, seed
        self.stop_at_eos = stop_at_eos
        self.prompt_ids: list[int] = ids
        self.steps: list[StepRecord] = []
        self._ids = list(ids)
        self._records_bytes = 0
        self._generator = torch.Generator()  # on the CPU, where the draw is made (same draws on every device)
        # The next step's read, made early by next_distribution(): (len(ids) it read, logits, lens answers, computed).
        self._pending: tuple[int, torch.Tensor, tuple[list[int], list[float]] | None, int] | None = None
        self._cache: KVCache | None = None  # kept only while the context is uncropped
        # Attention rows, a ring over positions: (n_layers, n_heads, attn_window + UNDO_ROWS, attn_window),
        # valid for positions [_lo, _hi), computed in the context starting at _rows_c0.
        self._rows: torch.Tensor | None = None
        self._lo = self._hi = self._rows_c0 = 0

    # --- state
    @property
    def ids(self) -> list[int]:
        """Prompt + generated ids (never cropped)."""
        return list(self._ids)

    @property
    def generated_ids(self) -> list[int]:
        return self._ids[len(self.prompt_ids) :]

    @property
    def text(self) -> str:
        return self._decode(self._ids)

    @property
    def prompt_text(self) -> str:
        return self._decode(self.prompt_ids)

    @property
    def generated_text(self) -> str:
        return self._decode(self.generated_ids)

    @property
    def finished(self) -> bool:
        """``stop_at_eos`` is on and the last token is ``<|endoftext|>``."""
        return self.stop_at_eos and bool(self.steps) and self._ids[-1] == ENDOFTEXT_ID

    @property
    def sampling(self) -> dict[str, object]:
        """The current sampling settings, as keywords of :meth:`set_sampling`."""
        return dict(temperature=self.temperature, sample_top_k=self.sample_top_k, top_p=self.top_p, seed=self.seed)

    def set_sampling(
        self,
        *,
        temperature: float | object = _KEEP,
        sample_top_k: int | None | object = _KEEP,
        top_p: float | None | object = _KEEP,
        seed: int | object = _KEEP,
    ) -> None:
        """Change sampling settings for the next steps: ``temperature`` (0 = greedy),
        ``sample_top_k`` (None: off), ``top_p`` (None: off), ``seed``; those not given stay.
        All are checked before anything changes (ValueError, nothing changed). Past steps keep
        theirs (each :class:`StepRecord` carries them), so ``set_sampling(temperature=r.temperature,
        sample_top_k=r.sample_top_k, top_p=r.top_p, seed=r.seed)`` before a step replays record r.
        Free: no model work (a kept next-step read stays valid)."""
        given = dict(temperature=temperature, sample_top_k=sample_top_k, top_p=top_p, seed=seed)
        new = {**self.sampling, **{k: v for k, v in given.items() if v is not _KEEP}}
        _check_sampling(new["temperature"], new["sample_top_k"], new["top_p"], self.model.cfg.vocab_size)
        _check_seed(new["seed"])
        self.temperature, self.sample_top_k = new["temperature"], new["sample_top_k"]
        self.top_p, self.seed = new["top_p"], new["seed"]

    # --- actions
    def step(self, n: int = 1) -> list[StepRecord]:
        """Append n tokens (greedy, or drawn with the sampling settings); returns their records."""
        return list(self.iter_steps(n))

    def iter_steps(self, n: int) -> Iterator[StepRecord]:
        """Like step(n) but yields each StepRecord as soon as it is produced (for streaming)."""
        if n < 0:
            raise ValueError(f"the number of steps must be >= 0, got {n}")
        return self._iter_steps(n)

    def _iter_steps(self, n: int) -> Iterator[StepRecord]:
        try:
            for _ in range(n):
                if self.finished:
                    return
                yield self._step()
        finally:
            self._enforce_budget()

    def undo(self) -> StepRecord:
        """Remove the last generated token; ValueError if only the prompt is left."""
        if not self.steps:
            raise ValueError("nothing to undo: only the prompt is left")
        record = self.steps.pop()
        self._records_bytes -= _deep_size(record)
        self._ids.pop()
        self._truncate()
        return record

    def reset(self) -> None:
        """Back to the prompt."""
        self.steps.clear()
        self._records_bytes = 0
        del self._ids[len(self.prompt_ids) :]
        self._truncate()

    # --- internals
    def _decode(self, ids: list[int]) -> str:
        n_vocab = self.enc.n_vocab
        raw = b"".join(self.enc.decode_single_token_bytes(i) if i < n_vocab else f"<{i}>".encode() for i in ids)
        return raw.decode("utf-8", errors="replace")

    def _piece(self, token_id: int) -> str:
        return token_piece(token_id, self.enc).text if token_id < self.enc.n_vocab else f"<{token_id}>"

    @property
    def batchable(self) -> bool:
        """The next step reads exactly one position through the kept cache (uncropped, its
        attention rows joined up): it can run in one batched forward with other sessions' steps
        (:func:`step_together`). That position is the new one, or the last one again when a read
        of the whole context (a view after Reset) cached it already, as its own step would."""
        end = len(self._ids)
        return (self._pending is None and not self.finished and self._cache is not None
                and end <= self.model.cfg.context_length and end - 1 <= self._cache.length <= end
                and self._rows is not None and self._rows_c0 == 0 and end - 1 <= self._hi <= end
                and self._lo <= max(0, end - self.attn_window))

    @property
    def next_read_made(self) -> bool:
        """The next step's read is made and kept (read ahead, or by :meth:`next_distribution`):
        that step runs no forward pass."""
        return self._pending is not None and self._pending[0] == len(self._ids)

    @property
    def fresh(self) -> bool:
        """Nothing read yet and the prompt fits the displayed attention window: its first read is
        one traced forward over the prompt, which can run batched with other fresh sessions'
        (:func:`read_together`)."""
        end = len(self._ids)
        return (self._pending is None and self._cache is None and self._rows is None and 0 < end
                and end <= min(self.attn_window, self.model.cfg.context_length))

    def _step(self) -> StepRecord:
        t0 = time.perf_counter()
        end = len(self._ids)
        start = max(0, end - self.model.cfg.context_length)
        logits, lens_answers, computed = self._next_read()
        self._pending = None
        probs = torch.softmax(logits.float(), dim=-1)  # (vocab,)
        greedy = int(torch.argmax(probs))  # the source: softmax, then argmax
        sampled = self.temperature > 0
        sample_probs, kept = self._distribution(logits, greedy)  # (vocab,) on the CPU
        token_id = self._draw(sample_probs, end) if sampled else greedy
        top = torch.topk(probs, min(self.top_k, probs.numel()))
        candidates = self._candidates(top.indices.tolist(), top.values.tolist(), sample_probs, kept)
        lens: list[LensEntry] = []
        if lens_answers is not None:  # the lens of every block but the last, from the read's product with the head
            top1_ids, top1_probs = lens_answers
            ids = top1_ids + [greedy]  # the last layer's lens is the model's own prediction
            ps = top1_probs + [float(probs[greedy])]
            lens = [LensEntry(layer, i, self._piece(i), p) for layer, (i, p) in enumerate(zip(ids, ps))]
        self._ids.append(token_id)
        record = StepRecord(
            token_id=token_id,
            piece=self._piece(token_id),
            candidates=candidates,
            lens=lens,
            cropped=start > 0,
            context_len=end - start,
            positions_computed=computed,
            cache_tokens=self.cache_tokens,
            cache_bytes=self.cache_bytes,
            ms=(time.perf_counter() - t0) * 1e3,
            position=end,
            sampled=sampled,
            temperature=self.temperature,
            sample_top_k=self.sample_top_k,
            top_p=self.top_p,
            seed=self.seed,
            sample_prob=float(sample_probs[token_id]),
            n_kept=int(kept.sum()),
        )
        self.steps.append(record)
        self._records_bytes += _deep_size(record)
        return record

    def _next_read(self) -> tuple[torch.Tensor, tuple[list[int], list[float]] | None, int]:
        """The read of the next step: the one next_distribution() kept, else a fresh one."""
        end = len(self._ids)
        if self._pending is not None and self._pending[0] == end:
            return self._pending[1:]
        return self._read(end)

    def _distribution(self, logits: torch.Tensor, greedy: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`sampling_distribution` of the current settings on the CPU ``(vocab,)``; greedy:
        the argmax the step takes (``greedy``, computed on the model's device)."""
        if self.temperature == 0:
            kept = torch.zeros(logits.shape[-1], dtype=torch.bool)
            kept[greedy] = True
            return kept.double(), kept
        return sampling_distribution(logits.cpu(), self.temperature, self.sample_top_k, self.top_p)

    def _candidates(self, ids: list[int], probs: list[float], sample_probs: torch.Tensor,
                    kept: torch.Tensor) -> list[Candidate]:
        sp, kp = sample_probs[ids].tolist(), kept[ids].tolist()
        return [Candidate(i, self._piece(i), p, s, k) for i, p, s, k in zip(ids, probs, sp, kp)]

    def next_distribution(self, k: int | None = None) -> NextDistribution:
        """What the next step will draw from under the current settings, before it is taken:
        the ``k`` (default ``top_k``) most probable next tokens with their plain probability,
        their probability after temperature / top-k / top-p and whether each may be drawn.

        Cost: the first call after an action runs the next step's read (one position with a warm
        cache; the prompt on a fresh session) and keeps its result, the next step's logits
        ``(vocab,)`` (201 kB in fp32 for GPT-2) plus the lens answers, counted in
        :attr:`retained_bytes`; the step then uses it instead of running the model again, so a
        visitor who steps pays nothing extra. Later calls (e.g. after :meth:`set_sampling`)
        reuse it: no model work, only the cut-offs (a sort of the vocabulary, ~2 ms).
        """
        k = self.top_k if k is None else k
        vocab = self.model.cfg.vocab_size
        if not 1 <= k <= vocab:
            raise ValueError(f"k must be between 1 and vocab_size={vocab}, got {k}")
        end = len(self._ids)
        if self._pending is None or self._pending[0] != end:
            self._pending = (end, *self._read(end))
        logits = self._pending[1]
        probs = torch.softmax(logits.float(), dim=-1)  # (vocab,)
        greedy = int(torch.argmax(probs))
        sample_probs, kept = self._distribution(logits, greedy)
        top = torch.topk(probs, min(k, probs.numel()))
        candidates = self._candidates(top.indices.tolist(), top.values.tolist(), sample_probs, kept)
        mass = float(probs.cpu()[kept].double().sum())
        self._enforce_budget()
        return NextDistribution(end, candidates, int(kept.sum()), mass, self.temperature == 0)

    def _draw(self, probs: torch.Tensor, position: int) -> int:
        """One draw from ``probs`` (vocab,) on the CPU, seeded by (seed, position) only."""
        self._generator.manual_seed((self.seed * 1_000_003 + position) % 2**63)
        return int(torch.multinomial(probs, 1, generator=self._generator))


def generate_greedy(model: GPTModel, idx: torch.Tensor, max_new_tokens: int, context_size: int) -> torch.Tensor:
    """The source's ``generate_text_simple`` contract and output, computed with a KV cache.

    ``idx``: ``(batch, T)`` token ids; returns ``(batch, T + max_new_tokens)``. While the ids
    fit in ``context_size`` each step feeds only the new token; once they overflow, each step
    recomputes the last ``context_size`` tokens (positions shift, as in the source).
    """
    _require_eval(model)
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must be (batch, T) with T >= 1, got shape {tuple(idx.shape)}")
    cache = KVCache.for_config(model.cfg)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if idx.shape[1] > context_size:  # cropped: the cache no longer applies
                logits = model(idx[:, -context_size:], last_only=True)
            else:
                logits = model(idx[:, cache.length :], cache, last_only=True)
            logits = logits[:, -1, :]  # (batch, vocab)
            probas = torch.softmax(logits, dim=-1)  # (batch, vocab)
            idx_next = torch.argmax(probas, dim=-1, keepdim=True)  # (batch, 1)
            idx = torch.cat((idx, idx_next), dim=1)  # (batch, n_tokens + 1)
    return idx
