"""What a generation session reads from the model and what it keeps of the reads: the KV cache,
the attention rows shown, the memory budget (:class:`SessionReads`, the base of
:class:`~gptviz.generation.session.GenerationSession`).

Attention for display comes from two paths:

* **window** (``attention(layer)``, ``window <= attn_window``): composed from attention
  rows kept per position (each row holds a query's weights on the ``attn_window`` keys
  ending at itself, which is all any later window needs). A cached step adds one row
  per layer; a prefill records rows for the last ``attn_window`` positions only. Free.
* **recompute** (``window > attn_window``, e.g. :meth:`SessionReads.full_attention`):
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

import torch
import torch.nn.functional as F

from ..ids import require_eval
from ..kv_cache import KVCache
from ..model import GPTModel
from ..trace import VALUES, Trace

#: Attention rows kept beyond the window, so this many undos need no recompute.
UNDO_ROWS = 16
#: A prefill runs the context through the model in pieces of this many positions (via the cache):
#: the temporaries stay small (cache-friendly, few fresh pages) and so does the peak memory.
PREFILL_CHUNK = 256


_require_eval = require_eval  # the one eval-mode check (gptviz.ids)


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


def predict_with_lens(model: GPTModel, finals: torch.Tensor, kept: list[torch.Tensor | None],
                      ) -> tuple[list[torch.Tensor], list[tuple[list[int], list[float]] | None]]:
    """The model's next-token logits for each row of ``finals`` ``(b, emb)`` — the residual stream
    after the last block at a session's last position, as ``forward(..., head=False)`` returns
    it — and each session's logit lens: top-1 ids and probabilities of ``out_head(final_norm(r))``
    for the rows of ``kept[i]`` ``(n_layers - 1, emb)`` (None: that session's lens is off).

    NEW (speed): one product with the output head for every row of every session. The head is the
    model's largest matrix and a step is as fast as its weights stream from memory, so the
    prediction and all the lens rows share one read of it (gpt2-small on two cores: 12 rows take
    7-9 ms, one row 4-5 ms, the 11 lens rows alone took ~8.6 ms more). It is the forward's own ``out_head(final_norm(x))`` on more rows at once: the same
    numbers to float32 rounding (tests: against the plain forward and the uncached lens).
    Returns ``(logits (vocab,) per session, lens answers per session)``.
    """
    rows: list[torch.Tensor] = []
    lens_rows: list[int] = []  # where the lens rows are among all rows
    for x, r in zip(finals, kept):
        if r is not None:
            lens_rows += range(len(rows), len(rows) + len(r))
            rows += r
        rows.append(x)
    with torch.inference_mode():
        logits = model.logit_lens(torch.stack(rows))  # (n, vocab): every lens row and prediction in one product
        top_ids: list[int] = []
        top_probs: list[float] = []
        if lens_rows:
            lens = logits[lens_rows].float()  # (n_lens, vocab)
            top = lens.max(dim=-1)
            top_ids = top.indices.tolist()
            top_probs = torch.exp(top.values - torch.logsumexp(lens, dim=-1)).tolist()  # softmax at the top-1
    predictions: list[torch.Tensor] = []
    answers: list[tuple[list[int], list[float]] | None] = []
    row = done = 0  # the next row of logits; lens answers handed out
    for r in kept:
        n = 0 if r is None else len(r)
        answers.append(None if r is None else (top_ids[done : done + n], top_probs[done : done + n]))
        predictions.append(logits[row + n].clone())  # (vocab,), not a view that would keep all rows alive
        row, done = row + n + 1, done + n
    return predictions, answers


class SessionReads:
    """The model reads of a :class:`~gptviz.generation.session.GenerationSession` and what they keep.

    Works on the session's state, set by its ``__init__``: ``model``, ``attn_window``,
    ``logit_lens``, ``max_retained_bytes``, ``steps``, ``_ids``, ``_records_bytes``, ``_pending``
    (the next step's read), ``_cache`` (the KV cache), ``_rows`` / ``_lo`` / ``_hi`` / ``_rows_c0``
    (the attention rows, a ring over positions).
    """

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
        if self._pending is not None:  # the next step's logits (vocab,) and lens answers
            pending = sum(t.numel() * t.element_size() if isinstance(t, torch.Tensor) else _deep_size(t)
                          for t in self._pending[1:3] if t is not None)
        return self.cache_bytes + rows + pending + self._records_bytes + _deep_size(self._ids)


    # --- observation
    def _window(self, layer: int, window: int | None) -> tuple[int, int, int]:
        """(start, end, w): :attr:`context_span` and the ``window`` (default ``attn_window``) of it
        shown, after checking ``layer`` and ``window``."""
        n_layers = self.model.cfg.n_layers
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer must be between 0 and {n_layers - 1}, got {layer}")
        window = self.attn_window if window is None else window
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        start, end = self.context_span
        return start, end, min(window, end - start)

    def attention(self, layer: int, window: int | None = None) -> tuple[torch.Tensor, list[int]]:
        """Attention weights of `layer` over the last `window` tokens (default attn_window) of
        the current sequence: ``(n_heads, W, W)`` (row = query, column = key, causal) and the
        absolute positions of those W tokens.

        The sequence is :attr:`context_span` (what the latest prediction read). Windows up to
        ``attn_window`` come from the kept rows (re-read only if undo went past them);
        larger ones are recomputed with one forward pass. Returned as float32 on the CPU.
        """
        start, end, w = self._window(layer, window)
        if w > self.attn_window:  # recompute path
            _require_eval(self.model)
            trace = Trace(("attn_weights",), layers=[layer], last_rows=w)
            with torch.no_grad():
                self.model(self._tensor(start, end), trace=trace, last_only=True, head=False)  # only the trace is wanted
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
            self.model(self._tensor(start, end), trace=trace, last_only=True, head=False)  # only the trace is wanted
        square = trace.attentions[0][0, :, :, -w:]  # (n_heads, w, w)
        return square.float().cpu().contiguous(), list(range(end - w, end))

    def full_attention(self, layer: int) -> tuple[torch.Tensor, list[int]]:
        """The whole causal T×T attention of `layer` over :attr:`context_span` (recomputed)."""
        start, end = self.context_span
        return self.attention(layer, window=end - start)

    def values(self, layer: int, window: int | None = None) -> tuple[torch.Tensor, list[int]]:
        """Value vectors of `layer` for the positions of :meth:`attention` (same ``window``):
        ``(n_heads, W, head_dim)`` float32 on the CPU, and the W absolute positions.

        Cost: read from the KV cache when it holds those positions (the usual case while the
        context fits: free); otherwise one forward pass over :attr:`context_span` recording only
        that layer's values (``Trace(VALUES)``), the cost of a prefill of the context.
        """
        start, end, w = self._window(layer, window)
        cache = self._cache
        if cache is not None and start == 0 and cache.length >= end:  # the cache is for the context from 0
            v = cache.layers[layer].v[0, :, end - w : end]  # (n_heads, w, head_dim)
        else:
            _require_eval(self.model)
            trace = Trace((VALUES,), layers=[layer], last_rows=w)
            with torch.inference_mode():
                self.model(self._tensor(start, end), trace=trace, last_only=True, head=False)  # only the trace is wanted
            v = trace.get(VALUES)[0][0]  # (n_heads, w, head_dim)
        return v.float().cpu().contiguous(), list(range(end - w, end))
    # --- internals
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
            self._cache = KVCache.for_config(self.model.cfg, first.chunk) if keep > 0 else None
            with torch.inference_mode():
                for old, new in zip(cache.layers, self._cache.layers if keep > 0 else []):
                    new.update(old.k[:, :, :keep], old.v[:, :, :keep])
        if self.retained_bytes > self.max_retained_bytes:
            self._rows, self._lo, self._hi = None, 0, 0

    def _read(self, end: int) -> tuple[torch.Tensor, tuple[list[int], list[float]] | None, int]:
        """Run the model over the context ending before position ``end`` (the last
        ``context_length`` tokens), reusing the KV cache where it is valid and recording the
        attention rows of the last ``attn_window`` positions that are not kept yet.

        Returns the last position's logits ``(vocab,)``, the logit lens of every block but the
        last (top-1 ids and probabilities, from the same product with the head; None if the lens
        is off) and the number of positions computed.
        """
        model, width = self.model, self.attn_window
        _require_eval(model)
        cfg = model.cfg
        c0 = max(0, end - cfg.context_length)  # the source crops to the last context_length tokens
        r0 = max(c0, end - width)  # first position whose attention row is displayed
        rows_ok = self._rows is not None and self._rows_c0 == c0 and self._lo <= r0 <= self._hi
        a = min(max(self._hi, r0) if rows_ok else r0, end - 1)  # first position to trace (at least the last)
        # Cropping shifts every position, so a cache is only ever kept for an uncropped context.
        cache = self._cache if (self._cache is not None and c0 == 0) else KVCache.for_config(model.cfg)
        s = min(c0 + cache.length, a)  # first position to compute
        cache.truncate(s - c0)
        trace = Trace(("attn_weights", "residual") if self.logit_lens else ("attn_weights",))
        with torch.inference_mode():
            for i in range(s, a, PREFILL_CHUNK):  # positions whose rows are not displayed: no trace
                model(self._tensor(i, min(i + PREFILL_CHUNK, a)), cache, head=False)  # only the cache is wanted
            final = model(self._tensor(a, end), cache, trace=trace, last_only=True, head=False)[:, -1]  # (1, emb)
            kept = self._absorb(end, a, c0, cache, trace.attentions, trace.residuals)
            (logits,), (lens,) = predict_with_lens(model, final, [kept])  # one product with the head (NEW: speed)
        return logits, lens, end - s

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

