"""Look inside the model: live tensor shapes beside the code, head ablation, precision, KV cache.

Every function here observes the shared model read-only: nothing is modified, and the
results are plain pandas DataFrames, small dataclasses and strings that a UI can show.

* :func:`trace_shapes`: every module call of a real forward pass, in order, with input and
  output shapes and the line of ``gptviz/model.py`` that made the call (plus the attention
  intermediates the model's :class:`~gptviz.model.Trace` records); :func:`model_source`
  gives the source text those line numbers refer to. The tracer lives in :mod:`gptviz.analysis.shapes`;
  this module re-exports it.
* :func:`ablate`: switch attention heads off (``head_mask``) and compare the next-token
  candidates with the normal run.
* :func:`compare_precision`: the same step in fp32 and in bf16 (or fp16).
* :func:`kv_cache_table` and :func:`cache_savings`: what a :class:`~gptviz.model.KVCache`
  holds and the work it saves.
"""

from __future__ import annotations

import copy
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any, Generator, Iterable, Mapping, Sequence

import pandas as pd
import torch

from ..config import GPTConfig
from ..ids import TokenIds, as_batch
from ..kv_cache import KVCache
from ..model import GPTModel
from .shapes import collapse_blocks, model_source, trace_shapes

__all__ = [
    "model_source",
    "trace_shapes",
    "collapse_blocks",
    "parse_heads",
    "head_mask_for",
    "ablate",
    "ablate_in_slices",
    "compare_precisions_in_slices",
    "next_logits_in_slices",
    "finish",
    "AblationResult",
    "low_precision_copy",
    "compare_precision",
    "PrecisionResult",
    "side_by_side",
    "PAIR_COLUMNS",
    "kv_cache_table",
    "forward_flops",
    "cache_savings",
    "CacheSavings",
]

HeadSpec = str | Iterable[tuple[int, int]] | torch.Tensor


# --------------------------------------------------------------------------- shared helpers


@torch.no_grad()
def _next_logits(model: GPTModel, batch: torch.Tensor, head_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of the next token, ``(vocab,)`` on the CPU (which also waits for an
    accelerator to finish), exactly as a generation step computes them."""
    return model(batch, head_mask=head_mask, last_only=True)[0, -1].cpu()


#: A computation that can pause: between slices of work it yields the number of positions that
#: slice ran (for progress), and it returns its result.
Slices = Generator[int, None, Any]

#: The longest slice an adaptive slicing (``slice_seconds``) grows to.
MAX_SLICE = 512


def finish(work: Slices) -> Any:
    """Run sliced work to the end, without pausing; its result."""
    while True:
        try:
            next(work)
        except StopIteration as done:
            return done.value


def next_logits_in_slices(model: GPTModel, batch: torch.Tensor, head_mask: torch.Tensor | None = None,
                          slice_len: int | None = None, clock: list[float] | None = None,
                          slice_seconds: float | None = None, schedule: list[int] | None = None) -> Slices:
    """:func:`_next_logits` as sliced work: with ``slice_len``, the positions run through a KV cache
    ``slice_len`` at a time, pausing after each slice (so a long input does not hold a shared model
    for a whole forward; the logits agree with the one-pass forward to float tolerance, as a cached
    step does). ``clock``: compute seconds are added to ``clock[0]`` (pauses excluded).

    ``slice_seconds``: each next slice is sized to take about that long, from the last one's
    speed (1 to :data:`MAX_SLICE` positions; ``slice_len`` is the first), so a slow dtype (float16
    on a CPU: ~10 ms per position) pauses as often as a fast one. ``schedule``: an empty list
    records the slice lengths run; a filled one is followed, so forwards that must agree exactly
    (the same model with and without heads switched off) slice the input the same way.
    """
    t0 = time.perf_counter()
    n = batch.shape[1]
    if slice_len is None or n <= slice_len:
        logits = _next_logits(model, batch, head_mask)
    else:
        cache = KVCache.for_config(model.cfg)
        follow = iter(schedule) if schedule else None
        length = next(follow, None) if follow is not None else slice_len
        with torch.no_grad():
            while length is not None and n - cache.length > length:
                model(batch[:, cache.length : cache.length + length], cache, head_mask=head_mask, head=False)  # the cache
                spent = time.perf_counter() - t0
                if clock is not None:
                    clock[0] += spent
                if schedule is not None and follow is None:
                    schedule.append(length)
                yield length
                if follow is not None:
                    length = next(follow, None)
                elif slice_seconds is not None:
                    length = max(1, min(MAX_SLICE, round(length * slice_seconds / max(spent, 1e-4))))
                t0 = time.perf_counter()
            logits = model(batch[:, cache.length :], cache, head_mask=head_mask, last_only=True)[0, -1].cpu()
    if clock is not None:
        clock[0] += time.perf_counter() - t0
    return logits


#: Columns of :func:`side_by_side`: run a's top-k ids and probabilities, the probability run b
#: gives those same tokens, and run b's own top-k.
PAIR_COLUMNS = ("rank", "a_id", "a_p", "b_p_same", "b_id", "b_p")


def side_by_side(a: torch.Tensor, b: torch.Tensor, top_k: int) -> pd.DataFrame:
    """Top-k candidates of two logit vectors side by side (:data:`PAIR_COLUMNS`): each run's
    own top-k, and the probability the second run gives the first run's tokens."""
    pa, pb = torch.softmax(a.float(), -1), torch.softmax(b.float(), -1)
    k = min(top_k, a.numel())
    ta, tb = pa.topk(k), pb.topk(k)
    values = (range(1, k + 1), ta.indices.tolist(), ta.values.tolist(), pb[ta.indices].tolist(),
              tb.indices.tolist(), tb.values.tolist())
    return pd.DataFrame(dict(zip(PAIR_COLUMNS, values)))



# --------------------------------------------------------------------------- head ablation

_HEAD = re.compile(r"^(?:L(?P<l1>\d+)H(?P<h1>\d+|\*)|(?P<l2>\d+)[.:](?P<h2>\d+|\*))$", re.IGNORECASE)


def parse_heads(spec: str | Iterable[tuple[int, int]], n_layers: int, n_heads: int) -> frozenset[tuple[int, int]]:
    """Attention heads as ``{(layer, head), ...}``, zero-based.

    ``spec`` is text, heads separated by commas or spaces: ``"0.3, 5.1"``, ``"L0H3 L5H1"``,
    ``"2:0"``; ``"4.*"`` / ``"L4H*"`` is every head of layer 4; ``""`` is no head. Or an
    iterable of ``(layer, head)`` pairs. ``ValueError`` for anything else, naming the limit.
    """
    if isinstance(spec, str):
        pairs: list[tuple[int, int | None]] = []
        for item in re.split(r"[\s,;]+", spec.strip()):
            if not item:
                continue
            m = _HEAD.match(item)
            if m is None:
                raise ValueError(f"cannot read head {item!r}: write layer.head (e.g. 0.3), L0H3, or 4.* for a whole layer")
            layer, head = m["l1"] or m["l2"], m["h1"] or m["h2"]
            pairs.append((int(layer), None if head == "*" else int(head)))
    else:
        pairs = []
        for pair in spec:
            layer, head = pair
            if any(isinstance(v, bool) or not isinstance(v, int) for v in (layer, head)):
                raise ValueError(f"a head is a pair of integers (layer, head), got {pair!r}")
            pairs.append((layer, head))
    heads = set()
    for layer, head in pairs:
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} is out of range: the model has {n_layers} layers (0 … {n_layers - 1})")
        if head is not None and not 0 <= head < n_heads:
            raise ValueError(f"head {head} is out of range: each layer has {n_heads} heads (0 … {n_heads - 1})")
        heads.update((layer, h) for h in (range(n_heads) if head is None else [head]))
    return frozenset(heads)


def head_mask_for(heads: Iterable[tuple[int, int]], cfg: GPTConfig) -> torch.Tensor:
    """The model's ``head_mask``: ``(n_layers, n_heads)`` ones, 0 at each head to switch off."""
    mask = torch.ones(cfg.n_layers, cfg.n_heads)
    for layer, head in heads:
        mask[layer, head] = 0
    return mask


@dataclass(frozen=True, eq=False)
class AblationResult:
    heads: tuple[tuple[int, int], ...]  # heads switched off, sorted
    table: pd.DataFrame  # top-k "normal" and "ablated" side by side
    logits: torch.Tensor  # (vocab,) next-token logits of the normal run
    ablated_logits: torch.Tensor  # (vocab,) with the heads switched off
    max_logit_change: float  # max |ablated - normal| over the vocabulary
    top1_changed: bool


def ablate(model: GPTModel, ids: TokenIds, heads: HeadSpec, top_k: int = 10) -> AblationResult:
    """Next-token candidates with chosen attention heads switched off, beside the normal run.

    ``heads``: a spec for :func:`parse_heads`, or a ``(n_layers, n_heads)`` head mask
    (0 switches a head off). The heads' per-head outputs are multiplied by the mask before
    ``out_proj`` through the model's ``head_mask`` argument; the model is not modified.
    """
    return finish(ablate_in_slices(model, ids, heads, top_k))


def ablate_in_slices(model: GPTModel, ids: TokenIds, heads: HeadSpec, top_k: int = 10,
                     slice_len: int | None = None, slice_seconds: float | None = None) -> Slices:
    """:func:`ablate` as sliced work (see :func:`next_logits_in_slices`); returns the AblationResult.
    Both runs are computed the same way, so with no head off they are equal exactly."""
    cfg = model.cfg
    batch = as_batch(model, ids)
    if isinstance(heads, torch.Tensor):
        if tuple(heads.shape) != (cfg.n_layers, cfg.n_heads):
            raise ValueError(f"head mask must have shape ({cfg.n_layers}, {cfg.n_heads}), got {tuple(heads.shape)}")
        mask = heads.float()
        off = tuple(map(tuple, (mask != 1).nonzero().tolist()))
    else:
        off = tuple(sorted(parse_heads(heads, cfg.n_layers, cfg.n_heads)))
        mask = head_mask_for(off, cfg)
    schedule: list[int] = []  # both runs slice alike: with no head off they are equal exactly
    normal = yield from next_logits_in_slices(model, batch, None, slice_len, slice_seconds=slice_seconds,
                                              schedule=schedule)
    ablated = yield from next_logits_in_slices(model, batch, mask.to(model.device), slice_len,
                                               slice_seconds=slice_seconds, schedule=schedule)
    change = (ablated.float() - normal.float()).abs().max().item()
    return AblationResult(
        heads=off,
        table=side_by_side(normal, ablated, top_k),  # a = normal, b = ablated
        logits=normal,
        ablated_logits=ablated,
        max_logit_change=change,
        top1_changed=int(normal.argmax()) != int(ablated.argmax()),
    )


# --------------------------------------------------------------------------- precision


def low_precision_copy(model: GPTModel, dtype: torch.dtype = torch.bfloat16) -> GPTModel:
    """A copy of the model in ``dtype`` (the original is untouched); cache it per model."""
    return copy.deepcopy(model).to(dtype).eval()


@dataclass(frozen=True, eq=False)
class PrecisionResult:
    dtype: torch.dtype  # of the low-precision run
    reference_dtype: torch.dtype  # of the shared model (normally float32)
    logits: torch.Tensor  # (vocab,) reference: exactly the normal next-token logits
    low_logits: torch.Tensor  # (vocab,) low-precision logits, as float32
    max_abs_diff: float
    top1_agree: bool
    topk_agree: bool  # the same set of top-k tokens
    topk_overlap: int  # tokens the two top-k sets share
    ms_reference: float  # median wall time of one forward
    ms_low: float
    table: pd.DataFrame  # top-k of both side by side (a = reference, b = low precision)


def _timed(model: GPTModel, batch: torch.Tensor, repeats: int, slice_len: int | None,
           slice_seconds: float | None = None) -> Slices:
    """Sliced work returning (next-token logits, median ms of ``repeats`` forwards after one warm-up);
    the time counts computation only, never the pauses between slices."""
    schedule: list[int] = []  # the timed repeats slice as the first run did
    logits = yield from next_logits_in_slices(model, batch, None, slice_len, slice_seconds=slice_seconds,
                                              schedule=schedule)
    times = []
    for _ in range(repeats):
        clock = [0.0]
        yield from next_logits_in_slices(model, batch, None, slice_len, clock, slice_seconds, schedule)
        times.append(clock[0] * 1000)
    return logits, statistics.median(times)


def compare_precision(
    model: GPTModel,
    ids: TokenIds,
    dtype: torch.dtype = torch.bfloat16,
    top_k: int = 10,
    low_model: GPTModel | None = None,
    repeats: int = 3,
) -> PrecisionResult:
    """The current step's next-token logits from ``model`` (fp32) and from a low-precision
    copy (``low_model``, e.g. a cached :func:`low_precision_copy`; a ``dtype`` copy is made
    temporarily if not given): largest logit difference, agreement of top-1 and the top-k set,
    and the median time of ``repeats`` forwards of each."""
    if low_model is None:
        low_model = low_precision_copy(model, dtype)
    return finish(compare_precisions_in_slices(model, ids, [low_model], top_k, repeats))[0]


def compare_precisions_in_slices(model: GPTModel, ids: TokenIds, low_models: Sequence[GPTModel], top_k: int = 10,
                                 repeats: int = 3, slice_len: int | None = None,
                                 slice_seconds: float | None = None) -> Slices:
    """:func:`compare_precision` against several low-precision copies at once (the reference runs
    once), as sliced work; returns one PrecisionResult per copy."""
    for low_model in low_models:
        if low_model.cfg != model.cfg:
            raise ValueError("low_model must have the same configuration as model")
    batch = as_batch(model, ids)
    ref, ms_ref = yield from _timed(model, batch, repeats, slice_len, slice_seconds)
    results = []
    for low_model in low_models:
        low, ms_low = yield from _timed(low_model, batch, repeats, slice_len, slice_seconds)
        low = low.float()
        k = min(top_k, ref.numel())
        ref_top, low_top = set(ref.topk(k).indices.tolist()), set(low.topk(k).indices.tolist())
        results.append(PrecisionResult(
            dtype=low_model.dtype,
            reference_dtype=model.dtype,
            logits=ref,
            low_logits=low,
            max_abs_diff=(low - ref.float()).abs().max().item(),
            top1_agree=int(ref.argmax()) == int(low.argmax()),
            topk_agree=ref_top == low_top,
            topk_overlap=len(ref_top & low_top),
            ms_reference=ms_ref,
            ms_low=ms_low,
            table=side_by_side(ref, low, top_k),
        ))
    return results


# --------------------------------------------------------------------------- KV cache


def kv_cache_table(cache: KVCache) -> pd.DataFrame:
    """Per layer: the shapes of the filled keys and values ``(b, n_heads, T, head_dim)``,
    the allocated capacity, and bytes filled vs allocated (keys and values together)."""
    rows = []
    for i, layer in enumerate(cache.layers):
        if layer.k is None:
            rows.append({"layer": i, "K shape": "—", "V shape": "—", "allocated shape": "—", "filled bytes": 0, "allocated bytes": 0})
            continue
        k, v = layer.k[:, :, : layer.length], layer.v[:, :, : layer.length]
        rows.append(
            {
                "layer": i,
                "K shape": str(tuple(k.shape)),
                "V shape": str(tuple(v.shape)),
                "allocated shape": str(tuple(layer.k.shape)),
                "filled bytes": k.numel() * k.element_size() + v.numel() * v.element_size(),
                "allocated bytes": layer.nbytes,
            }
        )
    return pd.DataFrame(rows, columns=["layer", "K shape", "V shape", "allocated shape", "filled bytes", "allocated bytes"])


def forward_flops(cfg: GPTConfig | Mapping[str, Any], queries: int, keys: int) -> int:
    """Matrix-multiply FLOPs of one forward that runs ``queries`` new positions against
    ``keys`` positions in all (cached ones included), logits for the last position only:

    ``2·12·d²·L·queries`` (the linear layers: 3 projections, out_proj, two feed-forward
    linears) ``+ 4·d·L·queries·keys`` (scores q·kᵀ and the weighted sum of values)
    ``+ 2·V·d`` (output head). Layer norms, GELU, softmax and bias adds are left out.
    """
    cfg = GPTConfig.coerce(cfg)
    d, n_layers = cfg.emb_dim, cfg.n_layers
    return 2 * 12 * d * d * n_layers * queries + 4 * d * n_layers * queries * keys + 2 * cfg.vocab_size * d


@dataclass(frozen=True)
class CacheSavings:
    context_len: int  # positions the step's prediction depends on
    positions_cached: int  # positions run through the model with the cache (the new ones)
    positions_full: int  # positions run when recomputing the whole context
    flops_cached: int
    flops_full: int

    @property
    def saving(self) -> float:
        """How many times less work the cached step does."""
        return self.flops_full / self.flops_cached


def cache_savings(cfg: GPTConfig | Mapping[str, Any], context_len: int, new_tokens: int = 1) -> CacheSavings:
    """The work of a step with a KV cache (only the ``new_tokens`` positions run; earlier
    keys and values are read from the cache) against recomputing all ``context_len``
    positions, counted by :func:`forward_flops`."""
    cfg = GPTConfig.coerce(cfg)
    if not 1 <= new_tokens <= context_len <= cfg.context_length:
        raise ValueError(
            f"need 1 <= new_tokens <= context_len <= context_length ({cfg.context_length}), "
            f"got new_tokens={new_tokens}, context_len={context_len}"
        )
    cached = forward_flops(cfg, new_tokens, context_len)
    full = forward_flops(cfg, context_len, context_len)
    return CacheSavings(context_len, new_tokens, context_len, cached, full)
