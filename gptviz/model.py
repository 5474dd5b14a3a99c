"""The GPT model of the source material, module for module, plus three additions
that never change its numbers:

* a KV cache (:class:`KVCache`) so a generation step processes only the new token(s);
* a :class:`Trace` that records intermediate tensors (attention weights, the residual
  stream after each block, ...) while the forward pass runs;
* an optional ``head_mask`` that switches off attention heads (ablation).

Without a cache, trace or head mask, ``GPTModel(cfg)(in_idx)`` is the source's forward.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from .config import GPTConfig

__all__ = [
    "GELU",
    "FeedForward",
    "MultiHeadAttention",
    "LayerNorm",
    "TransformerBlock",
    "GPTModel",
    "KVCache",
    "LayerKVCache",
    "Trace",
    "LayerTrace",
    "select_device",
]


# --------------------------------------------------------------------------- observation


class Trace:
    """Records named intermediate tensors of one forward pass (observation only).

    ``names`` chooses what to keep (``None`` keeps everything recorded). Names recorded by
    the model, per layer:

    * ``"queries"``, ``"keys"``, ``"values"``: ``(b, n_heads, T, head_dim)`` (keys and values
      include cached positions);
    * ``"attn_scores"``: ``(b, n_heads, T_q, T_k)`` masked scores before softmax;
    * ``"attn_weights"``: ``(b, n_heads, T_q, T_k)`` rows sum to 1, zero above the diagonal;
    * ``"context"``: ``(b, T, n_heads, head_dim)`` per-head outputs before ``out_proj``;
    * ``"residual"``: ``(b, T, emb_dim)`` the residual stream after the block.

    ``layers`` restricts recording to some blocks; ``last_rows`` keeps only the last rows
    along the query/position axis (dim -2), e.g. ``last_rows=1`` keeps what a
    next-token prediction needs. Recorded tensors are detached; nothing recorded feeds
    back into the computation.
    """

    def __init__(
        self,
        names: Iterable[str] | None = ("attn_weights", "residual"),
        layers: Iterable[int] | None = None,
        last_rows: int | None = None,
    ) -> None:
        self.names = None if names is None else frozenset(names)
        self.layers = None if layers is None else frozenset(layers)
        self.last_rows = last_rows
        self.tensors: dict[tuple[int, str], torch.Tensor] = {}

    def layer(self, idx: int) -> "LayerTrace | None":
        if self.layers is not None and idx not in self.layers:
            return None
        return LayerTrace(self, idx)

    def wants(self, name: str) -> bool:
        return self.names is None or name in self.names

    def record(self, layer: int, name: str, tensor: torch.Tensor) -> None:
        if not self.wants(name):
            return
        t = tensor.detach()
        if self.last_rows is not None:  # a copy, so the full tensor can be freed
            rows = slice(-self.last_rows, None)
            t = (t[:, rows] if name == "context" else t[..., rows, :]).clone()
        elif name in ("keys", "values"):  # views into the KV cache, which later steps overwrite
            t = t.clone()
        self.tensors[(layer, name)] = t

    def get(self, name: str) -> list[torch.Tensor]:
        """Every recorded tensor of that name, in layer order."""
        return [t for (layer, n), t in sorted(self.tensors.items(), key=lambda kv: kv[0][0]) if n == name]

    @property
    def attentions(self) -> list[torch.Tensor]:
        """Attention weights per layer: ``(b, n_heads, T_q, T_k)`` each."""
        return self.get("attn_weights")

    @property
    def residuals(self) -> list[torch.Tensor]:
        """The residual stream after each block: ``(b, T, emb_dim)`` each."""
        return self.get("residual")


class LayerTrace:
    """A :class:`Trace` bound to one block, handed down to the block's modules."""

    def __init__(self, trace: Trace, idx: int) -> None:
        self.trace, self.idx = trace, idx

    def wants(self, name: str) -> bool:
        return self.trace.wants(name)

    def record(self, name: str, tensor: torch.Tensor) -> None:
        self.trace.record(self.idx, name, tensor)


# --------------------------------------------------------------------------- KV cache


class LayerKVCache:
    """Keys and values of one attention layer for the positions processed so far.

    Storage grows in chunks of ``chunk`` positions (never beyond ``capacity_limit``),
    so a short session does not pay for the full context.
    """

    def __init__(self, capacity_limit: int, chunk: int = 128) -> None:
        self.capacity_limit = capacity_limit
        self.chunk = chunk
        self.k: torch.Tensor | None = None  # (b, n_heads, capacity, head_dim)
        self.v: torch.Tensor | None = None  # (b, n_heads, capacity, head_dim)
        self.length = 0

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``(b, n_heads, T_new, head_dim)`` keys/values; return all of them so far."""
        n_new = k_new.shape[2]
        end = self.length + n_new
        if self.k is None or end > self.k.shape[2]:
            self._grow(k_new, end)
        self.k[:, :, self.length : end] = k_new
        self.v[:, :, self.length : end] = v_new
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def _grow(self, like: torch.Tensor, needed: int) -> None:
        capacity = min(self.capacity_limit, -(-needed // self.chunk) * self.chunk)
        capacity = max(capacity, needed)
        b, h, _, d = like.shape
        k = like.new_empty((b, h, capacity, d))
        v = like.new_empty((b, h, capacity, d))
        if self.k is not None and self.length:
            k[:, :, : self.length] = self.k[:, :, : self.length]
            v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v

    def truncate(self, length: int) -> None:
        """Forget positions from ``length`` on (used by undo)."""
        self.length = min(self.length, length)

    @property
    def nbytes(self) -> int:
        """Bytes allocated (capacity, not just the filled part)."""
        if self.k is None:
            return 0
        return self.k.numel() * self.k.element_size() * 2


class KVCache:
    """Per-layer keys and values, so each generation step runs only the new tokens.

    ``KVCache.for_model(model)`` makes an empty one; pass it to ``model(ids, cache)``
    repeatedly with the *new* ids only. Logits equal those of the full recompute.
    """

    def __init__(self, n_layers: int, context_length: int, chunk: int = 128) -> None:
        self.layers = [LayerKVCache(context_length, chunk) for _ in range(n_layers)]
        self.context_length = context_length

    @classmethod
    def for_model(cls, model: "GPTModel", chunk: int = 128) -> "KVCache":
        return cls(model.cfg.n_layers, model.cfg.context_length, chunk)

    @property
    def length(self) -> int:
        """Number of positions cached."""
        return self.layers[0].length if self.layers else 0

    def truncate(self, length: int) -> None:
        for layer in self.layers:
            layer.truncate(length)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def used_bytes(self) -> int:
        """Bytes of the filled positions (what a perfectly sized cache would hold)."""
        first = self.layers[0] if self.layers else None
        if first is None or first.k is None:
            return 0
        b, h, _, d = first.k.shape
        return 2 * len(self.layers) * b * h * self.length * d * first.k.element_size()


# --------------------------------------------------------------------------- the model


class GELU(nn.Module):
    """Gaussian error linear unit, tanh approximation (as GPT-2 uses)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))))


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),  # (b, T, emb) -> (b, T, 4*emb)
            GELU(),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),  # (b, T, 4*emb) -> (b, T, emb)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MultiHeadAttention(nn.Module):
    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int, qkv_bias: bool = False
    ) -> None:
        super().__init__()
        if d_out % num_heads:
            raise ValueError(f"d_out must be divisible by num_heads: {d_out} % {num_heads} != 0")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)  # combines the heads' outputs
        self.dropout = nn.Dropout(dropout)
        # True above the diagonal: a query may not look at later keys.
        self.register_buffer(
            "mask", torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1), persistent=False
        )

    def forward(
        self,
        x: torch.Tensor,
        cache: LayerKVCache | None = None,
        trace: LayerTrace | None = None,
        head_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, num_tokens, d_in = x.shape  # (b, T, d_in)

        keys = self.W_key(x)  # (b, T, d_out)
        queries = self.W_query(x)  # (b, T, d_out)
        values = self.W_value(x)  # (b, T, d_out)

        # Split d_out into heads: (b, T, d_out) -> (b, T, n_heads, head_dim) -> (b, n_heads, T, head_dim)
        keys = keys.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        queries = queries.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = values.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

        if cache is not None:  # prepend the cached positions
            keys, values = cache.update(keys, values)  # (b, n_heads, T_k, head_dim)
        num_keys = keys.shape[2]
        offset = num_keys - num_tokens  # absolute position of the first query

        attn_scores = queries @ keys.transpose(2, 3)  # (b, n_heads, T, T_k)
        mask_bool = self.mask[offset : offset + num_tokens, :num_keys]  # (T, T_k)
        attn_scores.masked_fill_(mask_bool, -torch.inf)

        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)  # (b, n_heads, T, T_k)
        attn_weights = self.dropout(attn_weights)

        context_vec = (attn_weights @ values).transpose(1, 2)  # (b, T, n_heads, head_dim)
        if head_mask is not None:  # ablation: 0 switches a head off
            context_vec = context_vec * head_mask.to(context_vec.dtype).view(1, 1, self.num_heads, 1)

        if trace is not None:
            trace.record("queries", queries)
            trace.record("keys", keys)
            trace.record("values", values)
            trace.record("attn_scores", attn_scores)
            trace.record("attn_weights", attn_weights)
            trace.record("context", context_vec)

        context_vec = context_vec.contiguous().view(b, num_tokens, self.d_out)  # (b, T, d_out)
        context_vec = self.out_proj(context_vec)  # (b, T, d_out)
        return context_vec


class LayerNorm(nn.Module):
    def __init__(self, emb_dim: int) -> None:
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)  # biased variance, as GPT-2
        norm_x = (x - mean) / torch.sqrt(var + self.eps)
        return self.scale * norm_x + self.shift


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg.emb_dim,
            d_out=cfg.emb_dim,
            context_length=cfg.context_length,
            num_heads=cfg.n_heads,
            dropout=cfg.drop_rate,
            qkv_bias=cfg.qkv_bias,
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(
        self,
        x: torch.Tensor,
        cache: LayerKVCache | None = None,
        trace: LayerTrace | None = None,
        head_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Shortcut connection around the attention sub-block
        shortcut = x
        x = self.norm1(x)
        x = self.att(x, cache, trace, head_mask)  # (b, T, emb)
        x = self.drop_shortcut(x)
        x = x + shortcut

        # Shortcut connection around the feed-forward sub-block
        shortcut = x
        x = self.norm2(x)
        x = self.ff(x)
        x = self.drop_shortcut(x)
        x = x + shortcut
        if trace is not None:
            trace.record("residual", x)
        return x


class GPTModel(nn.Module):
    """The source's GPTModel. ``GPTModel(cfg)`` takes a :class:`GPTConfig` or the source's dict."""

    def __init__(self, cfg: GPTConfig | Mapping[str, Any]) -> None:
        super().__init__()
        cfg = GPTConfig.coerce(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)

        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])

        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:  # GPT-2's weight tying: one Parameter for both
            self.out_head.weight = self.tok_emb.weight

    def forward(
        self,
        in_idx: torch.Tensor,
        cache: KVCache | None = None,
        *,
        trace: Trace | None = None,
        head_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits ``(b, T, vocab_size)`` for token ids ``(b, T)``.

        ``cache``: a :class:`KVCache`; ``in_idx`` then holds only the positions after those
        already cached. ``trace``: a :class:`Trace` to record into. ``head_mask``:
        ``(n_layers, n_heads)``, 0 switches a head off. ``last_only``: compute logits for
        the last position only, ``(b, 1, vocab_size)`` (what generation needs).
        """
        batch_size, seq_len = in_idx.shape
        start = cache.length if cache is not None else 0
        if start + seq_len > self.cfg.context_length:
            raise ValueError(
                f"input of {start + seq_len} tokens is longer than context_length="
                f"{self.cfg.context_length}; crop it to the last {self.cfg.context_length} tokens"
            )
        if head_mask is not None and tuple(head_mask.shape) != (self.cfg.n_layers, self.cfg.n_heads):
            raise ValueError(
                f"head_mask must have shape (n_layers, n_heads) = ({self.cfg.n_layers}, {self.cfg.n_heads}), "
                f"got {tuple(head_mask.shape)}"
            )
        tok_embeds = self.tok_emb(in_idx)  # (b, T, emb)
        pos_embeds = self.pos_emb(torch.arange(start, start + seq_len, device=in_idx.device))  # (T, emb)
        x = tok_embeds + pos_embeds  # (b, T, emb)
        x = self.drop_emb(x)
        for i, block in enumerate(self.trf_blocks):
            x = block(
                x,
                None if cache is None else cache.layers[i],
                None if trace is None else trace.layer(i),
                None if head_mask is None else head_mask[i],
            )
        if last_only:
            x = x[:, -1:, :]  # (b, 1, emb)
        x = self.final_norm(x)
        logits = self.out_head(x)  # (b, T, vocab)
        return logits

    def logit_lens(self, residual: torch.Tensor) -> torch.Tensor:
        """What the model would predict from a residual stream: ``out_head(final_norm(x))``."""
        return self.out_head(self.final_norm(residual))

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_emb.weight.dtype


def select_device() -> torch.device:
    """cuda if available, else mps, else cpu; ``GPTVIZ_DEVICE`` (e.g. ``cpu``) overrides."""
    override = os.environ.get("GPTVIZ_DEVICE", "").strip()
    if override:
        return torch.device(override)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
