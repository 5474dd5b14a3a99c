"""Head-role atlas: what each attention head does, measured on probes the model reads.

:func:`head_roles` builds its own probe inputs (random token ids, no data set, no network; or,
with ``text_ids``, stretches of a real text, :func:`text_probe_ids`), runs the model once over them with a :class:`~gptviz.trace.Trace` of the attention weights, and
scores every head ``(layer, head)`` for five well-known roles (:data:`ROLES`), each a number in
[0, 1]: the mean attention weight the head puts on the key that role predicts.
:func:`role_scores` is the scoring alone, on attention tensors (so synthetic patterns can be
scored too). :func:`cached_head_roles` memoises the table per shared model.

:func:`value_weighted` reweights attention by how much each key's value vector actually
contributes (``weight × ‖v_j‖``, optionally through ``out_proj``), so a head that parks its
attention on a near-zero "sink" value visibly attends to little there;
:func:`session_value_weighted` does this for a generation session's displayed window.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Sequence

import pandas as pd
import torch

from ..model import GPTModel
from ..tokenizer import ENDOFTEXT_ID
from ..trace import ATTN_WEIGHTS, Trace

if TYPE_CHECKING:
    from ..generation.session import GenerationSession

__all__ = [
    "known_head_roles",
    "ROLES",
    "role_scores",
    "probe_ids",
    "text_probe_ids",
    "head_roles",
    "strongest_role",
    "cached_head_roles",
    "value_norms",
    "value_weighted",
    "session_value_weighted",
]

#: The roles scored, in the column order of :func:`head_roles`.
ROLES = ("previous_token", "first_token", "induction", "duplicate_token", "self")
#: Roles that need the repeated probe (``repeat_len``).
REPEAT_ROLES = ("induction", "duplicate_token")
#: Default length of the random sequence that the probe repeats (the probe is twice as long).
DEFAULT_PROBE_LEN = 64
#: Default number of probe sequences, run as one batch (the scores are their mean).
DEFAULT_N_PROBES = 2


def _diagonal_mean(attn: torch.Tensor, offset: int, queries: range) -> torch.Tensor:
    """Mean over query positions ``i`` in ``queries`` of ``attn[..., i, i - offset]``."""
    i = torch.tensor(list(queries), device=attn.device)
    return attn[..., i, i - offset].mean(dim=-1)


def role_scores(attn: torch.Tensor, repeat_len: int | None = None) -> dict[str, torch.Tensor]:
    """Role scores of attention patterns ``(..., T, T)`` (row = query, column = key; e.g.
    ``(n_layers, n_heads, T, T)``), each ``(...)`` (e.g. ``(n_layers, n_heads)``), float32.

    With ``w[i, j]`` the weight from query ``i`` to key ``j``:

    * ``previous_token`` = mean over ``i = 1 … T-1`` of ``w[i, i-1]``;
    * ``first_token`` (the "attention sink") = mean over ``i = 1 … T-1`` of ``w[i, 0]``
      (position 0 can only attend to itself, so it is left out);
    * ``self`` = mean over ``i = 1 … T-1`` of ``w[i, i]`` (position 0 left out, as above).

    With ``repeat_len = R`` the input is a sequence of R tokens followed by its repetition
    (token ``i`` equals token ``i - R`` for ``i >= R``; ``R < T <= 2R``), and also:

    * ``induction`` = mean over the second copy ``i = R … T-1`` of ``w[i, i-R+1]``: the token
      right after the earlier occurrence of token ``i`` (what an induction head copies next);
    * ``duplicate_token`` = mean over ``i = R … T-1`` of ``w[i, i-R]``: the earlier occurrence itself.

    Each is a mean of weights in [0, 1], so in [0, 1]; they are linear in ``attn``, so the
    scores of a batch-mean pattern are the mean of the scores. T must be at least 2.
    """
    T = attn.shape[-1]
    if attn.dim() < 2 or attn.shape[-2] != T:
        raise ValueError(f"attn must be (..., T, T), got shape {tuple(attn.shape)}")
    if T < 2:
        raise ValueError("attn needs at least 2 positions (the roles look at earlier keys)")
    a = attn.float()
    scores = {
        "previous_token": _diagonal_mean(a, 1, range(1, T)),
        "first_token": a[..., 1:, 0].mean(dim=-1),
        "self": _diagonal_mean(a, 0, range(1, T)),
    }
    if repeat_len is not None:
        if not 1 <= repeat_len < T <= 2 * repeat_len:
            raise ValueError(f"repeat_len must satisfy repeat_len < T <= 2 * repeat_len (T={T}), got {repeat_len}")
        second = range(repeat_len, T)
        scores["induction"] = _diagonal_mean(a, repeat_len - 1, second)
        scores["duplicate_token"] = _diagonal_mean(a, repeat_len, second)
    return {role: scores[role] for role in ROLES if role in scores}


def probe_ids(vocab_size: int, probe_len: int, n_probes: int = DEFAULT_N_PROBES, seed: int = 0) -> torch.Tensor:
    """The probe: ``(n_probes, 2 * probe_len)`` token ids, each row ``probe_len`` distinct random
    ids (never ``<|endoftext|>`` = 50256) followed by the same ids again. Drawn with a local
    ``torch.Generator`` seeded with ``seed`` (the global RNG is untouched)."""
    pool = vocab_size - (1 if ENDOFTEXT_ID < vocab_size else 0)
    if not 2 <= probe_len <= pool:
        raise ValueError(f"probe_len must be between 2 and {pool} (distinct token ids), got {probe_len}")
    if n_probes < 1:
        raise ValueError(f"n_probes must be at least 1, got {n_probes}")
    g = torch.Generator().manual_seed(seed)
    rows = torch.stack([torch.randperm(pool, generator=g)[:probe_len] for _ in range(n_probes)])  # (n, R)
    rows = rows + (rows >= ENDOFTEXT_ID).long()  # skip 50256: ids above it move up by one
    return torch.cat([rows, rows], dim=1)  # (n, 2R)


def text_probe_ids(text_ids: Sequence[int], probe_len: int, n_probes: int = DEFAULT_N_PROBES) -> torch.Tensor:
    """A probe from a real text: ``(n_probes, 2 * probe_len)``, row ``r`` the text's tokens
    ``r * probe_len … (r + 1) * probe_len - 1`` followed by the same tokens again (fewer rows when
    the text is shorter; at least one). Unlike :func:`probe_ids` a token may occur twice in a row's
    first half, so induction and duplicate-token scores count only the exact earlier position."""
    ids = list(text_ids)
    if probe_len < 2:
        raise ValueError(f"probe_len must be at least 2, got {probe_len}")
    rows = min(n_probes, len(ids) // probe_len)
    if rows < 1:
        raise ValueError(f"the text has {len(ids)} tokens: a text probe needs at least probe_len = {probe_len}")
    first = torch.tensor(ids[: rows * probe_len], dtype=torch.long).view(rows, probe_len)  # (rows, R)
    return torch.cat([first, first], dim=1)  # (rows, 2R)


class _RoleTrace(Trace):
    """Scores each layer's attention as it is recorded, keeping only ``(n_heads,)`` per role
    (all layers' attention of gpt2-xl on the default probe would be ~300 MB)."""

    def __init__(self, repeat_len: int) -> None:
        super().__init__((ATTN_WEIGHTS,))
        self.repeat_len = repeat_len
        self.scores: dict[int, dict[str, torch.Tensor]] = {}

    def record(self, layer: int, name: str, tensor: torch.Tensor, line: int = 0) -> None:
        if name == ATTN_WEIGHTS:
            mean = tensor.detach().float().mean(dim=0)  # (n_heads, T, T), mean over the probes
            self.scores[layer] = {k: v.cpu() for k, v in role_scores(mean, self.repeat_len).items()}


def head_roles(
    model: GPTModel,
    probe_len: int | None = None,
    seed: int = 0,
    n_probes: int = DEFAULT_N_PROBES,
    text_ids: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Role scores of every attention head, from the model's own attention on a probe.

    The probe (:func:`probe_ids`): ``n_probes`` rows of ``probe_len`` distinct random token
    ids repeated twice (length ``T = 2 * probe_len``; default ``probe_len`` =
    min(64, context_length // 2)), run as one batch in **one forward pass** (no grad); the
    attention of each layer is averaged over the rows and scored with
    :func:`role_scores` (``repeat_len = probe_len``): previous_token, first_token and self
    over positions 1 … T-1, induction and duplicate_token over the second copy. Random ids make
    the scores about position and repetition, not meaning. With ``text_ids`` (token ids of a real
    text) the probe is :func:`text_probe_ids` instead (``seed`` unused): a model trained on a
    small corpus may never have seen most random ids, and a text shows what it does on text.

    Returns one row per (layer, head), ordered by layer then head: columns ``layer``,
    ``head`` and one per role in :data:`ROLES`, each in [0, 1]. ``df.attrs`` records the
    probe (``probe_len``, ``n_probes``, ``seed``). The model must be in eval mode; it is
    only read. Cost: one forward of ``n_probes × T`` tokens (124M at the defaults: 512 tokens).
    """
    if model.training:
        raise ValueError("the model is in training mode (dropout on): call model.eval() first")
    cfg = model.cfg
    if probe_len is None:
        probe_len = min(DEFAULT_PROBE_LEN, cfg.context_length // 2)
    if 2 * probe_len > cfg.context_length:
        raise ValueError(f"the probe (2 × probe_len = {2 * probe_len}) must fit context_length={cfg.context_length}")
    if text_ids is None:
        ids = probe_ids(cfg.vocab_size, probe_len, n_probes, seed)  # (n_probes, T)
    else:
        ids = text_probe_ids(text_ids, probe_len, n_probes)  # (rows, T)
    ids = ids.to(model.device)
    trace = _RoleTrace(probe_len)
    with torch.inference_mode():
        model(ids, trace=trace, last_only=True, head=False)  # only the trace is wanted
    rows = []
    for layer in range(cfg.n_layers):
        scores = trace.scores[layer]  # role -> (n_heads,)
        for head in range(cfg.n_heads):
            rows.append({"layer": layer, "head": head, **{r: float(scores[r][head]) for r in ROLES}})
    df = pd.DataFrame(rows, columns=["layer", "head", *ROLES])
    df.attrs.update(probe_len=probe_len, n_probes=int(ids.shape[0]), seed=seed, probe="random" if text_ids is None else "text")
    return df


def strongest_role(df: pd.DataFrame, layer: int, head: int, threshold: float = 0.4) -> tuple[str, float] | None:
    """The role with the highest score of head ``(layer, head)`` in a :func:`head_roles` table,
    and that score; None when no score reaches ``threshold`` (ties: the first in :data:`ROLES`).
    KeyError if the table has no such head."""
    row = df[(df["layer"] == layer) & (df["head"] == head)]
    if row.empty:
        raise KeyError(f"no head (layer={layer}, head={head}) in the table")
    scores = row.iloc[0][list(ROLES)].astype(float)
    role = str(scores.idxmax())
    score = float(scores[role])
    return (role, score) if score >= threshold else None


# --- caching per shared model

_CACHE: "weakref.WeakKeyDictionary[GPTModel, dict[tuple, pd.DataFrame]]" = weakref.WeakKeyDictionary()
_LOCKS: "weakref.WeakKeyDictionary[GPTModel, threading.Lock]" = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()


def cached_head_roles(
    model: GPTModel, probe_len: int | None = None, seed: int = 0, n_probes: int = DEFAULT_N_PROBES,
    text_ids: Sequence[int] | None = None,
) -> pd.DataFrame:
    """:func:`head_roles`, computed once per model (and arguments) on first use and kept while
    the model lives (a ``WeakKeyDictionary`` on the model object: a freed model frees its table).

    Thread-safe: concurrent callers for one model wait for a single computation (a lock per
    model, so different models compute in parallel). Returns a copy, so a caller that edits
    its table does not change what others get. The model's weights must not change afterwards
    (shared models are read-only).
    """
    key = (probe_len, seed, n_probes, None if text_ids is None else tuple(text_ids))
    with _GUARD:
        lock = _LOCKS.setdefault(model, threading.Lock())
    with lock:
        tables = _CACHE.get(model)
        if tables is None or key not in tables:
            df = head_roles(model, probe_len=probe_len, seed=seed, n_probes=n_probes, text_ids=text_ids)
            with _GUARD:
                _CACHE.setdefault(model, {})[key] = df
        table = _CACHE[model][key]
    out = table.copy()
    out.attrs = dict(table.attrs)
    return out


def known_head_roles(
    model: GPTModel, probe_len: int | None = None, seed: int = 0, n_probes: int = DEFAULT_N_PROBES,
    text_ids: Sequence[int] | None = None,
) -> pd.DataFrame | None:
    """The table :func:`cached_head_roles` keeps for ``model`` (same arguments) if it was already
    measured, else None: never measures. Shared: do not edit it."""
    with _GUARD:
        tables = _CACHE.get(model)
        key = (probe_len, seed, n_probes, None if text_ids is None else tuple(text_ids))
        return None if tables is None else tables.get(key)


# --- value-weighted attention


def value_norms(values: torch.Tensor, out_proj_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``‖v_j‖`` per head and key for ``values`` ``(..., n_heads, T_k, head_dim)`` → ``(..., n_heads, T_k)``.

    With ``out_proj_weight`` (``out_proj.weight``, ``(d_out, n_heads * head_dim)``): the norm of
    what the value adds to the output, ``‖W_O[:, h·hd:(h+1)·hd] v_j‖``, computed as
    ``sqrt(v_jᵀ G_h v_j)`` with the head's Gram matrix ``G_h = W_hᵀ W_h`` (head_dim × head_dim).
    """
    v = values.float()
    if out_proj_weight is None:
        return torch.linalg.vector_norm(v, dim=-1)
    n_heads, head_dim = v.shape[-3], v.shape[-1]
    w = out_proj_weight.detach().float().to(v.device)
    if w.shape[-1] != n_heads * head_dim:
        raise ValueError(f"out_proj_weight must have {n_heads} × {head_dim} input columns, got shape {tuple(w.shape)}")
    w_heads = w.view(w.shape[0], n_heads, head_dim)  # (d_out, n_heads, head_dim)
    gram = torch.einsum("ohd,ohe->hde", w_heads, w_heads)  # (n_heads, head_dim, head_dim)
    sq = torch.einsum("...htd,hde,...hte->...ht", v, gram, v)  # (..., n_heads, T_k)
    return sq.clamp(min=0).sqrt()


def value_weighted(
    attn: torch.Tensor, values: torch.Tensor, out_proj_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention weighted by the size of what each key contributes, renormalised per row.

    ``attn`` ``(n_heads, T_q, T_k)`` (leading batch dims allowed), ``values``
    ``(n_heads, T_k, head_dim)``: returns ``(n_heads, T_q, T_k)`` float32 with
    ``out[h, i, j] = attn[h, i, j] · n[h, j] / Σ_j' attn[h, i, j'] · n[h, j']`` where ``n`` is
    :func:`value_norms` (``‖v_j‖``, or ``‖W_O,h v_j‖`` with ``out_proj_weight``). Rows sum to
    1; a row whose products are all zero (e.g. every key it reads has a zero value) stays zero.
    Equal norms give back the attention itself.
    """
    if attn.shape[-1] != values.shape[-2] or attn.shape[-3] != values.shape[-3]:
        raise ValueError(
            f"attn (..., n_heads, T_q, T_k) {tuple(attn.shape)} and values (..., n_heads, T_k, head_dim) "
            f"{tuple(values.shape)} do not match"
        )
    norms = value_norms(values, out_proj_weight).to(attn.device)  # (..., n_heads, T_k)
    x = attn.float() * norms.unsqueeze(-2)  # (..., n_heads, T_q, T_k)
    total = x.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, x / torch.where(total > 0, total, 1.0), 0.0)


def session_value_weighted(
    session: "GenerationSession", layer: int, window: int | None = None, through_out_proj: bool = True
) -> tuple[torch.Tensor, list[int]]:
    """Value-weighted attention of `layer` over a session's displayed window: like
    ``session.attention(layer, window)`` (same ``(n_heads, W, W)`` and positions), reweighted
    with :func:`value_weighted` (through the layer's ``out_proj`` unless ``through_out_proj``
    is False).

    Cost: the attention as ``session.attention`` (free within ``attn_window``) plus the values
    from ``session.values`` (free from the KV cache while the context fits; otherwise one
    forward over the context recording that layer's values only).
    """
    attn, positions = session.attention(layer, window)
    values, value_positions = session.values(layer, len(positions))
    if value_positions != positions:  # both are the last W positions of context_span
        raise RuntimeError(f"attention positions {positions[:3]}… and value positions {value_positions[:3]}… differ")
    weight = session.model.trf_blocks[layer].att.out_proj.weight if through_out_proj else None
    return value_weighted(attn, values, weight), positions
