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

Sampling (:func:`sampling_distribution`): temperature 0 is the source's greedy argmax (the
default); temperature > 0 draws from ``softmax(logits / temperature)`` restricted to the top-k
logits, then to the top-p nucleus of what is left. The session draws from exactly the
distribution that function returns, so a chart of it shows what is drawn. The settings can
change between steps (:meth:`GenerationSession.set_sampling`) and every :class:`StepRecord`
carries the settings it used, so a recorded session can be replayed token for token.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import tiktoken
import torch
import torch.nn.functional as F

from .kv_cache import BatchKVCache, KVCache
from .model import GPTModel
from .trace import VALUES, Trace
from .tokenizer import ENDOFTEXT_ID, encode, token_piece

__all__ = [
    "Candidate",
    "LensEntry",
    "StepRecord",
    "NextDistribution",
    "GenerationSession",
    "generate_greedy",
    "step_together",
    "sampling_distribution",
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


#: "Leave this setting as it is" in :meth:`GenerationSession.set_sampling` (None means "off").
_KEEP = object()


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")


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
        # The next step's read, made early by next_distribution(): (len(ids) it read, logits, residuals, computed).
        self._pending: tuple[int, torch.Tensor, torch.Tensor | None, int] | None = None
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
        pending = 0
        if self._pending is not None:  # the next step's logits (vocab,) and lens residuals, kept by next_distribution
            pending = sum(t.numel() * t.element_size() for t in self._pending[1:3] if t is not None)
        return self.cache_bytes + rows + pending + self._records_bytes + _deep_size(self._ids)

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

    def read_by(self, k: int) -> tuple[int, int]:
        """Positions ``[start, end)`` of the tokens step ``k`` (1-based) read: the context it
        predicted from (cropped to the last ``context_length`` as the step was)."""
        if not 1 <= k <= len(self.steps):
            raise ValueError(f"step must be between 1 and {len(self.steps)}, got {k}")
        end = self.steps[k - 1].position
        return max(0, end - self.model.cfg.context_length), end

    def attention_at(self, k: int, layer: int, window: int | None = None) -> tuple[torch.Tensor, list[int]]:
        """:meth:`attention` as step ``k`` saw it (any past step): the latest step reads the kept
        rows; an earlier one is recomputed with one forward over the tokens it read."""
        if k == len(self.steps):
            return self.attention(layer, window)
        n_layers = self.model.cfg.n_layers
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer must be between 0 and {n_layers - 1}, got {layer}")
        start, end = self.read_by(k)
        w = min(self.attn_window if window is None else window, end - start)
        _require_eval(self.model)
        trace = Trace(("attn_weights",), layers=[layer], last_rows=w)
        with torch.inference_mode():
            self.model(self._tensor(start, end), trace=trace, last_only=True)
        square = trace.attentions[0][0, :, :, -w:]  # (n_heads, w, w)
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
        self._pending = None
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
            residuals = self._absorb(end, a, c0, cache, trace.attentions, trace.residuals)
        return logits, residuals, end - s

    def _absorb(self, end: int, a: int, c0: int, cache: KVCache, attentions: list[torch.Tensor],
                residuals: list[torch.Tensor]) -> torch.Tensor | None:
        """Keep what a read of positions ``[a, end)`` recorded (one batch row each): the attention
        rows to display, the cache; returns the lens residuals ``(n_layers - 1, emb)`` or None."""
        cfg, width = self.model.cfg, self.attn_window
        span = end - a + width - 1  # keys the new rows need
        attn = torch.stack([att[0, ..., -span:] for att in attentions])  # (L, n_heads, end - a, <= span)
        rows = _band(attn, width)  # (L, n_heads, end - a, width)
        if self._rows is None:
            shape = (cfg.n_layers, cfg.n_heads, width + UNDO_ROWS, width)
            self._rows = torch.zeros(shape, dtype=rows.dtype, device=rows.device)
        capacity = self._rows.shape[2]
        keep = min(end - a, capacity)
        slots = torch.arange(end - keep, end, device=rows.device) % capacity
        self._rows[:, :, slots] = rows[:, :, -keep:]
        lens = torch.stack([r[0, -1] for r in residuals])[:-1] if self.logit_lens else None  # (L - 1, emb)
        # Rows kept before `a` stay valid if they were computed in the same context and join up.
        lo = self._lo if (self._rows_c0 == c0 and self._lo <= a <= self._hi) else a
        self._lo, self._hi, self._rows_c0 = max(lo, end - capacity), end, c0
        self._cache = cache if c0 == 0 else None
        return lens

    @property
    def batchable(self) -> bool:
        """The next step reads exactly one new position through the kept cache (uncropped, its
        attention rows joined up): it can run in one batched forward with other sessions' steps
        (:func:`step_together`)."""
        end = len(self._ids)
        return (self._pending is None and not self.finished and self._cache is not None
                and end <= self.model.cfg.context_length and self._cache.length == end - 1
                and self._rows is not None and self._rows_c0 == 0 and self._hi == end - 1
                and self._lo <= max(0, end - self.attn_window))

    def _step(self) -> StepRecord:
        t0 = time.perf_counter()
        end = len(self._ids)
        start = max(0, end - self.model.cfg.context_length)
        logits, residuals, computed = self._next_read()
        self._pending = None
        probs = torch.softmax(logits.float(), dim=-1)  # (vocab,)
        greedy = int(torch.argmax(probs))  # the source: softmax, then argmax
        sampled = self.temperature > 0
        sample_probs, kept = self._distribution(logits, greedy)  # (vocab,) on the CPU
        token_id = self._draw(sample_probs, end) if sampled else greedy
        top = torch.topk(probs, min(self.top_k, probs.numel()))
        candidates = self._candidates(top.indices.tolist(), top.values.tolist(), sample_probs, kept)
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

    def _next_read(self) -> tuple[torch.Tensor, torch.Tensor | None, int]:
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
        ``(vocab,)`` (201 kB in fp32 for GPT-2) plus the lens residuals, counted in
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

    def values(self, layer: int, window: int | None = None) -> tuple[torch.Tensor, list[int]]:
        """Value vectors of `layer` for the positions of :meth:`attention` (same ``window``):
        ``(n_heads, W, head_dim)`` float32 on the CPU, and the W absolute positions.

        Cost: read from the KV cache when it holds those positions (the usual case while the
        context fits: free); otherwise one forward pass over :attr:`context_span` recording only
        that layer's values (``Trace(VALUES)``), the cost of a prefill of the context.
        """
        n_layers = self.model.cfg.n_layers
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer must be between 0 and {n_layers - 1}, got {layer}")
        window = self.attn_window if window is None else window
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        start, end = self.context_span
        w = min(window, end - start)
        cache = self._cache
        if cache is not None and start == 0 and cache.length >= end:  # the cache is for the context from 0
            v = cache.layers[layer].v[0, :, end - w : end]  # (n_heads, w, head_dim)
        else:
            _require_eval(self.model)
            trace = Trace((VALUES,), layers=[layer], last_rows=w)
            with torch.inference_mode():
                self.model(self._tensor(start, end), trace=trace, last_only=True)
            v = trace.get(VALUES)[0][0]  # (n_heads, w, head_dim)
        return v.float().cpu().contiguous(), list(range(end - w, end))

    def _lens_top1(self, residuals: torch.Tensor | tuple[list[int], list[float]]) -> tuple[list[int], list[float]]:
        """Top-1 id and probability of the logit lens ``out_head(final_norm(x))`` for each row of
        ``(n, emb)`` (or the answer itself, when :func:`step_together` computed it for a batch)."""
        if isinstance(residuals, tuple):
            return residuals
        return lens_top1(self.model, residuals)

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


# --------------------------------------------------------------------------- batched steps


def lens_top1(model: GPTModel, residuals: torch.Tensor) -> tuple[list[int], list[float]]:
    """Top-1 id and probability of the logit lens ``out_head(final_norm(x))`` for each row of
    ``(n, emb)``: one product with the output head for all rows (the head is the largest matrix
    of the model; reading it once for every block, and every visitor of a batch, is the point)."""
    with torch.inference_mode():
        normed = model.final_norm(residuals)  # (n, emb)
        logits = model.out_head(normed).float()  # (n, vocab), in the head's fastest layout
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
