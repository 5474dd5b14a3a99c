"""Step-through generation: the source's greedy loop, one token at a time, with a KV cache.

The source's ``generate_text_simple`` repeats: crop the ids to the last ``context_size``
tokens, run the model, take the last position's logits, softmax, argmax, append.
:func:`generate_greedy` keeps that contract and output but feeds the model only the new
token while the context fits (:class:`~gptviz.model.KVCache`); once the ids overflow the
context, positions shift, so every overflowing step recomputes the cropped context, as
the source does.

:class:`GenerationSession` is one visitor's step-through state. Each step records what
the model weighed (:class:`StepRecord`): the top-k candidates, the logit lens of every
layer, and the attention rows of the positions read. Attention for display comes from
two paths:

* **window** (``attention(layer)``, ``window <= attn_window``): composed from attention
  rows kept per position (each row holds a query's weights on the ``attn_window`` keys
  ending at itself, which is all any later window needs). A cached step adds one row
  per layer; a prefill records rows for the last ``attn_window`` positions only. Free.
* **recompute** (``window > attn_window``, e.g. :meth:`GenerationSession.full_attention`):
  one forward pass over the context with a :class:`~gptviz.model.Trace` of that layer.

Memory: the retained state (KV cache + attention rows + records) is kept under
``max_retained_bytes`` (64 MB by default) after every public action by shrinking the KV
cache to the longest prefix that fits (whole chunks of 128 positions); the next step
recomputes the positions past it, with the same tokens. For the 124M model in fp32 that
happens beyond 768 tokens (896 positions of keys and values take 66 MB), so a lone step at
1000 tokens recomputes ~232 positions; within one ``step(n)`` the cache is always kept.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import tiktoken
import torch
import torch.nn.functional as F

from .kv_cache import KVCache
from .model import GPTModel
from .trace import Trace
from .tokenizer import ENDOFTEXT_ID, encode, token_piece

__all__ = [
    "Candidate",
    "LensEntry",
    "StepRecord",
    "GenerationSession",
    "generate_greedy",
    "DEFAULT_MAX_RETAINED_BYTES",
]

#: Retained per-session state allowed after an action: the issue's 64 MB (10**6 bytes each, the stricter reading).
DEFAULT_MAX_RETAINED_BYTES = 64 * 10**6
#: Attention rows kept beyond the window, so this many undos need no recompute.
UNDO_ROWS = 16
#: A prefill runs the context through the model in pieces of this many positions (via the cache):
#: the temporaries stay small (cache-friendly, few fresh pages) and so does the peak memory.
PREFILL_CHUNK = 256


@dataclass(frozen=True, slots=True)
class Candidate:
    token_id: int
    piece: str  # display text of the token (gptviz.tokenizer.token_piece(...).text)
    prob: float  # softmax over the full vocabulary


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


def _require_eval(model: GPTModel) -> None:
    if model.training:
        raise ValueError(
            "the model is in training mode (dropout on): call model.eval() once after building it; "
            "generation never switches a shared model's mode"
        )


def _band(attn: torch.Tensor, width: int) -> torch.Tensor:
    """Causal attention of the last Q queries ``(..., Q, K)`` → ``(..., Q, width)``: row i holds
    query i's weights on the ``width`` keys ending at itself (zeros before the first key)."""
    q, k = attn.shape[-2:]
    span = q + width - 1  # keys any of the Q rows needs
    x = attn[..., max(0, k - span) :]
    x = F.pad(x, (span - x.shape[-1], 0))  # (..., Q, span)
    idx = torch.arange(q, device=attn.device)[:, None] + torch.arange(width, device=attn.device)  # (Q, width)
    return x.gather(-1, idx.expand(*x.shape[:-1], width))


def _unband(rows: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_band` for the square block of the last w positions:
    ``(..., w, width)`` → ``(..., w, w)`` causal (zeros above the diagonal)."""
    w, width = rows.shape[-2:]
    i = torch.arange(w, device=rows.device)
    col = (width - 1) - i[:, None] + i[None, :]  # key j of query i sits at column width-1-(i-j)
    square = rows.gather(-1, col.clamp(max=width - 1).expand(*rows.shape[:-1], w))
    return square.masked_fill(col > width - 1, 0.0)


def _deep_size(obj: object) -> int:
    """Approximate bytes of a record (dataclasses, lists, str, numbers)."""
    size = sys.getsizeof(obj)
    if dataclasses.is_dataclass(obj):
        size += sum(_deep_size(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    elif isinstance(obj, list):
        size += sum(_deep_size(v) for v in obj)
    return size


class GenerationSession:
    """One visitor's generation state (no global mutable state).

    ``GenerationSession(model, enc, prompt)`` with ``prompt`` a str (encoded with
    :func:`gptviz.tokenizer.encode`) or a list of ids. The model is shared read-only and
    must be in eval mode. Options: ``top_k`` candidates per step; ``attn_window`` positions
    of attention kept for display; ``logit_lens`` on/off; ``max_retained_bytes`` (None: no
    limit); sampling instead of argmax with ``temperature > 0`` (optionally restricted to
    ``sample_top_k``; the draw for a position depends only on ``seed`` and the position,
    so undo + step repeats it); ``stop_at_eos`` stops stepping after ``<|endoftext|>``.
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
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if sample_top_k is not None and not 1 <= sample_top_k <= cfg.vocab_size:
            raise ValueError(f"sample_top_k must be between 1 and vocab_size={cfg.vocab_size}, got {sample_top_k}")
        self.model, self.enc = model, enc
        self.top_k, self.logit_lens = top_k, logit_lens
        self.attn_window = min(attn_window, cfg.context_length)
        self.max_retained_bytes = max_retained_bytes
        self.temperature, self.sample_top_k, self.seed = temperature, sample_top_k, seed
        self.stop_at_eos = stop_at_eos
        self.prompt_ids: list[int] = ids
        self.steps: list[StepRecord] = []
        self._ids = list(ids)
        self._records_bytes = 0
        self._generator = torch.Generator(device=model.device)
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
    def context_span(self) -> tuple[int, int]:
        """Positions ``[start, end)`` of the tokens the latest prediction read: after a step,
        the input of that step (the newest token is not read yet); at the prompt, the prompt
        (what the first step reads). ``attention()`` is over this span."""
        end = len(self._ids) - 1 if self.steps else len(self._ids)
        return max(0, end - self.model.cfg.context_length), end

    @property
    def cache(self) -> KVCache | None:
        """The KV cache (None until the first step, or after the context overflowed); read-only use."""
        return self._cache

    @property
    def cache_tokens(self) -> int:
        return self._cache.length if self._cache is not None else 0

    @property
    def cache_bytes(self) -> int:
        return self._cache.nbytes if self._cache is not None else 0

    @property
    def retained_bytes(self) -> int:
        """Bytes this session holds beyond the shared model: KV cache, attention rows, records, ids."""
        rows = self._rows.numel() * self._rows.element_size() if self._rows is not None else 0
        return self.cache_bytes + rows + self._records_bytes + _deep_size(self._ids)

    # --- actions
    def step(self, n: int = 1) -> list[StepRecord]:
        """Append n greedy tokens; returns their records."""
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

    # --- observation
    def attention(self, layer: int, window: int | None = None) -> tuple[torch.Tensor, list[int]]:
        """Attention weights of `layer` over the last `window` tokens (default attn_window) of
        the current sequence: ``(n_heads, W, W)`` (row = query, column = key, causal) and the
        absolute positions of those W tokens.

        The sequence is :attr:`context_span` (what the latest prediction read). Windows up to
        ``attn_window`` come from the kept rows (re-read only if undo went past them);
        larger ones are recomputed with one forward pass. Returned as float32 on the CPU.
        """
        n_layers = self.model.cfg.n_layers
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer must be between 0 and {n_layers - 1}, got {layer}")
        window = self.attn_window if window is None else window
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        start, end = self.context_span
        w = min(window, end - start)
        if w > self.attn_window:  # recompute path
            _require_eval(self.model)
            trace = Trace(("attn_weights",), layers=[layer], last_rows=w)
            with torch.no_grad():
                self.model(self._tensor(start, end), trace=trace, last_only=True)
            square = trace.attentions[0][0, :, :, -w:]  # (n_heads, w, w)
        else:  # window path
            if not (self._rows is not None and self._rows_c0 == start and self._lo <= end - w and self._hi >= end):
                self._read(end)  # undo went past the kept rows, or nothing was read yet
            slots = torch.arange(end - w, end, device=self._rows.device) % self._rows.shape[2]
            square = _unband(self._rows[layer][:, slots])  # (n_heads, w, w)
            self._enforce_budget()
        return square.float().cpu().contiguous(), list(range(end - w, end))

    def full_attention(self, layer: int) -> tuple[torch.Tensor, list[int]]:
        """The whole causal T×T attention of `layer` over :attr:`context_span` (recomputed)."""
        start, end = self.context_span
        return self.attention(layer, window=end - start)

    # --- internals
    def _decode(self, ids: list[int]) -> str:
        n_vocab = self.enc.n_vocab
        raw = b"".join(self.enc.decode_single_token_bytes(i) if i < n_vocab else f"<{i}>".encode() for i in ids)
        return raw.decode("utf-8", errors="replace")

    def _piece(self, token_id: int) -> str:
        return token_piece(token_id, self.enc).text if token_id < self.enc.n_vocab else f"<{token_id}>"

    def _tensor(self, start: int, end: int) -> torch.Tensor:
        return torch.tensor([self._ids[start:end]], device=self.model.device)  # (1, T)

    def _truncate(self) -> None:
        """Forget cached keys/values and attention rows of positions no longer in the ids."""
        n = len(self._ids)
        if self._cache is not None:
            self._cache.truncate(n)
        self._hi = min(self._hi, n)
        self._lo = min(self._lo, self._hi)
        self._enforce_budget()

    def _enforce_budget(self) -> None:
        """While over ``max_retained_bytes``: shrink the KV cache to the longest prefix (whole
        chunks) that fits, so the next step recomputes only the positions past it; then drop the
        attention rows."""
        if self.max_retained_bytes is None or self.retained_bytes <= self.max_retained_bytes:
            return
        cache = self._cache
        if cache is not None and cache.length:
            first = cache.layers[0]
            per_position = cache.nbytes // first.k.shape[2]  # keys + values of one position, all layers
            fits = (self.max_retained_bytes - (self.retained_bytes - cache.nbytes)) // per_position
            keep = min(cache.length, fits // first.chunk * first.chunk)
            self._cache = KVCache.for_model(self.model, first.chunk) if keep > 0 else None
            with torch.inference_mode():
                for old, new in zip(cache.layers, self._cache.layers if keep > 0 else []):
                    new.update(old.k[:, :, :keep], old.v[:, :, :keep])
        if self.retained_bytes > self.max_retained_bytes:
            self._rows, self._lo, self._hi = None, 0, 0

    def _read(self, end: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Run the model over the context ending before position ``end`` (the last
        ``context_length`` tokens), reusing the KV cache where it is valid and recording the
        attention rows of the last ``attn_window`` positions that are not kept yet.

        Returns the last position's logits ``(vocab,)``, the residual stream at the last
        position after every block but the last ``(n_layers - 1, emb)`` (None if the lens is
        off) and the number of positions computed.
        """
        model, width = self.model, self.attn_window
        _require_eval(model)
        cfg = model.cfg
        c0 = max(0, end - cfg.context_length)  # the source crops to the last context_length tokens
        r0 = max(c0, end - width)  # first position whose attention row is displayed
        rows_ok = self._rows is not None and self._rows_c0 == c0 and self._lo <= r0 <= self._hi
        a = min(max(self._hi, r0) if rows_ok else r0, end - 1)  # first position to trace (at least the last)
        # Cropping shifts every position, so a cache is only ever kept for an uncropped context.
        cache = self._cache if (self._cache is not None and c0 == 0) else KVCache.for_model(model)
        s = min(c0 + cache.length, a)  # first position to compute
        cache.truncate(s - c0)
        trace = Trace(("attn_weights", "residual") if self.logit_lens else ("attn_weights",))
        with torch.inference_mode():
            for i in range(s, a, PREFILL_CHUNK):  # positions whose rows are not displayed: no trace
                model(self._tensor(i, min(i + PREFILL_CHUNK, a)), cache, last_only=True)
            logits = model(self._tensor(a, end), cache, trace=trace, last_only=True)[0, -1]  # (vocab,)
            span = end - a + width - 1  # keys the new rows need
            attn = torch.stack([att[0, ..., -span:] for att in trace.attentions])  # (L, n_heads, end - a, <= span)
            rows = _band(attn, width)  # (L, n_heads, end - a, width)
            if self._rows is None:
                shape = (cfg.n_layers, cfg.n_heads, width + UNDO_ROWS, width)
                self._rows = torch.zeros(shape, dtype=rows.dtype, device=rows.device)
            capacity = self._rows.shape[2]
            keep = min(end - a, capacity)
            slots = torch.arange(end - keep, end, device=rows.device) % capacity
            self._rows[:, :, slots] = rows[:, :, -keep:]
            residuals = None
            if self.logit_lens:
                residuals = torch.stack([r[0, -1] for r in trace.residuals])[:-1]  # (L - 1, emb)
        # Rows kept before `a` stay valid if they were computed in the same context and join up.
        lo = self._lo if (self._rows_c0 == c0 and self._lo <= a <= self._hi) else a
        self._lo, self._hi, self._rows_c0 = max(lo, end - capacity), end, c0
        self._cache = cache if c0 == 0 else None
        return logits, residuals, end - s

    def _step(self) -> StepRecord:
        t0 = time.perf_counter()
        end = len(self._ids)
        start = max(0, end - self.model.cfg.context_length)
        logits, residuals, computed = self._read(end)
        probs = torch.softmax(logits.float(), dim=-1)  # (vocab,)
        greedy = int(torch.argmax(probs))  # the source: softmax, then argmax
        sampled = self.temperature > 0
        token_id = self._sample(logits, end) if sampled else greedy
        top = torch.topk(probs, min(self.top_k, probs.numel()))
        candidates = [Candidate(i, self._piece(i), p) for i, p in zip(top.indices.tolist(), top.values.tolist())]
        lens: list[LensEntry] = []
        if residuals is not None:
            top1_ids, top1_probs = self._lens_top1(residuals)
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
        )
        self.steps.append(record)
        self._records_bytes += _deep_size(record)
        return record

    def _lens_top1(self, residuals: torch.Tensor) -> tuple[list[int], list[float]]:
        """Top-1 id and probability of the logit lens ``out_head(final_norm(x))`` for each row of
        ``(n, emb)``. Written as ``(W @ xᵀ)ᵀ``: for a few rows against the 50257 × emb head, MKL
        runs that about twice as fast as ``F.linear`` (what ``GPTModel.logit_lens`` calls)."""
        with torch.inference_mode():
            normed = self.model.final_norm(residuals)  # (n, emb)
            logits = (self.model.out_head.weight @ normed.T).T.contiguous().float()  # (n, vocab)
            top = logits.max(dim=-1)
            probs = torch.exp(top.values - torch.logsumexp(logits, dim=-1))  # softmax at the top-1
        return top.indices.tolist(), probs.tolist()

    def _sample(self, logits: torch.Tensor, position: int) -> int:
        """The source's sampling (chapter 5): keep the top-k logits, divide by the temperature,
        softmax, draw; seeded by (seed, position)."""
        logits = logits.float()
        if self.sample_top_k is not None:
            kth = torch.topk(logits, self.sample_top_k).values[-1]
            logits = logits.masked_fill(logits < kth, -torch.inf)
        probs = torch.softmax(logits / self.temperature, dim=-1)
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
    cache = KVCache.for_model(model)
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
