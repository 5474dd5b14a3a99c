"""Observation of a forward pass: :class:`Trace` records named intermediate tensors.

The model calls ``trace.record(name, tensor)`` right after the line that makes each tensor;
the trace keeps a detached copy (or, in subclasses, just its shape) and the line of
``gptviz/model.py`` the call came from, so a view can point at the code without matching
its text. Nothing recorded feeds back into the computation.
"""

from __future__ import annotations

import sys
from typing import Iterable

import torch

__all__ = ["Trace", "LayerTrace", "TRACE_NAMES"]  # and one constant per recorded name

#: The names the model records, per layer, in the order the forward pass makes them.
QUERIES, KEYS, VALUES = "queries", "keys", "values"
ATTN_SCORES, ATTN_WEIGHTS, CONTEXT = "attn_scores", "attn_weights", "context"
RESID_MID, FF_OUT, RESIDUAL = "resid_mid", "ff_out", "residual"
TRACE_NAMES = (QUERIES, KEYS, VALUES, ATTN_SCORES, ATTN_WEIGHTS, CONTEXT, RESID_MID, FF_OUT, RESIDUAL)


class Trace:
    """Records named intermediate tensors of one forward pass (observation only).

    ``names`` chooses what to keep (``None`` keeps everything recorded). Names recorded by
    the model, per layer:

    * ``"queries"``, ``"keys"``, ``"values"``: ``(b, n_heads, T, head_dim)`` (keys and values
      include cached positions);
    * ``"attn_scores"``: ``(b, n_heads, T_q, T_k)`` masked scores before softmax;
    * ``"attn_weights"``: ``(b, n_heads, T_q, T_k)`` rows sum to 1, zero above the diagonal;
    * ``"context"``: ``(b, T, n_heads, head_dim)`` per-head outputs before ``out_proj``;
    * ``"resid_mid"``: ``(b, T, emb_dim)`` the residual stream after the attention shortcut;
    * ``"ff_out"``: ``(b, T, emb_dim)`` the feed-forward's output, before its shortcut adds it;
    * ``"residual"``: ``(b, T, emb_dim)`` the residual stream after the block.

    ``layers`` restricts recording to some blocks; ``last_rows`` keeps only the last rows
    along the query/position axis (dim -2), e.g. ``last_rows=1`` keeps what a
    next-token prediction needs. Recorded tensors are detached; nothing recorded feeds
    back into the computation.
    """

    def __init__(
        self,
        names: Iterable[str] | None = (ATTN_WEIGHTS, RESIDUAL),
        layers: Iterable[int] | None = None,
        last_rows: int | None = None,
    ) -> None:
        self.names = None if names is None else frozenset(names)
        self.layers = None if layers is None else frozenset(layers)
        self.last_rows = last_rows
        self.tensors: dict[tuple[int, str], torch.Tensor] = {}
        #: (layer, name) -> the line of gptviz/model.py that recorded it (right after making it)
        self.lines: dict[tuple[int, str], int] = {}

    def layer(self, idx: int) -> "LayerTrace | None":
        if self.layers is not None and idx not in self.layers:
            return None
        return LayerTrace(self, idx)

    def wants(self, name: str) -> bool:
        return self.names is None or name in self.names

    def record(self, layer: int, name: str, tensor: torch.Tensor, line: int = 0) -> None:
        """Keep ``tensor`` as ``(layer, name)``; ``line``: where in gptviz/model.py it was made."""
        if not self.wants(name):
            return
        self.lines[(layer, name)] = line
        t = tensor.detach()
        if self.last_rows is not None:  # a copy, so the full tensor can be freed
            rows = slice(-self.last_rows, None)
            t = (t[:, rows] if name == CONTEXT else t[..., rows, :]).clone()
        elif name in (KEYS, VALUES):  # views into the KV cache, which later steps overwrite
            t = t.clone()
        self.tensors[(layer, name)] = t

    def get(self, name: str) -> list[torch.Tensor]:
        """Every recorded tensor of that name, in layer order."""
        return [t for (layer, n), t in sorted(self.tensors.items(), key=lambda kv: kv[0][0]) if n == name]

    @property
    def attentions(self) -> list[torch.Tensor]:
        """Attention weights per layer: ``(b, n_heads, T_q, T_k)`` each."""
        return self.get(ATTN_WEIGHTS)

    @property
    def residuals(self) -> list[torch.Tensor]:
        """The residual stream after each block: ``(b, T, emb_dim)`` each."""
        return self.get(RESIDUAL)


class LayerTrace:
    """A :class:`Trace` bound to one block, handed down to the block's modules."""

    def __init__(self, trace: Trace, idx: int) -> None:
        self.trace, self.idx = trace, idx

    def wants(self, name: str) -> bool:
        return self.trace.wants(name)

    def record(self, name: str, tensor: torch.Tensor) -> None:
        """Called by the model right after the line that makes ``tensor``: that line is kept."""
        self.trace.record(self.idx, name, tensor, sys._getframe(1).f_lineno)
