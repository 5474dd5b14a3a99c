"""The GPT model of the source material (chapter 4), module for module.

``GELU``, ``FeedForward``, ``MultiHeadAttention``, ``LayerNorm``, ``TransformerBlock`` and
``GPTModel`` keep the book's names, arguments and arithmetic. Three additions never change
its numbers; each is marked ``# NEW`` where it enters the forward pass:

* ``cache``: a :class:`~gptviz.kv_cache.KVCache`, so a generation step runs only the new token(s);
* ``trace``: a :class:`~gptviz.trace.Trace` that records intermediate tensors as they are made;
* ``head_mask``: switches attention heads off (ablation).

Without them, ``GPTModel(cfg)(in_idx)`` is the source's forward.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from .config import GPTConfig
from .kv_cache import KVCache, LayerKVCache
from .trace import ATTN_SCORES, ATTN_WEIGHTS, CONTEXT, FF_OUT, KEYS, QUERIES, RESID_MID, RESIDUAL, VALUES, LayerTrace, Trace

__all__ = ["GELU", "FeedForward", "MultiHeadAttention", "LayerNorm", "TransformerBlock", "GPTModel"]


def _ignore(name: str, tensor: torch.Tensor) -> None:
    """Stands in for ``trace.record`` when nothing is traced."""


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
        record = trace.record if trace is not None else _ignore  # NEW (trace)

        keys = self.W_key(x)  # (b, T, d_out)
        queries = self.W_query(x)  # (b, T, d_out)
        values = self.W_value(x)  # (b, T, d_out)

        # Split d_out into heads: (b, T, d_out) -> (b, T, n_heads, head_dim) -> (b, n_heads, T, head_dim)
        keys = keys.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        queries = queries.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = values.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

        if cache is not None:  # NEW (KV cache): prepend the cached positions
            keys, values = cache.update(keys, values)  # (b, n_heads, T_k, head_dim)
        record(QUERIES, queries)  # NEW (trace)
        record(KEYS, keys)  # NEW (trace)
        record(VALUES, values)  # NEW (trace)
        num_keys = keys.shape[2]
        offset = num_keys - num_tokens  # NEW (KV cache): absolute position of the first query

        attn_scores = queries @ keys.transpose(2, 3)  # (b, n_heads, T, T_k)
        mask_bool = self.mask[offset : offset + num_tokens, :num_keys]  # (T, T_k)
        attn_scores.masked_fill_(mask_bool, -torch.inf)
        record(ATTN_SCORES, attn_scores)  # NEW (trace)

        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)  # (b, n_heads, T, T_k)
        attn_weights = self.dropout(attn_weights)
        record(ATTN_WEIGHTS, attn_weights)  # NEW (trace)

        context_vec = (attn_weights @ values).transpose(1, 2)  # (b, T, n_heads, head_dim)
        if head_mask is not None:  # NEW (ablation): 0 switches a head off
            context_vec = context_vec * head_mask.to(context_vec.dtype).view(1, 1, self.num_heads, 1)
        record(CONTEXT, context_vec)  # NEW (trace)

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
        record = trace.record if trace is not None else _ignore  # NEW (trace)
        # Shortcut connection around the attention sub-block
        shortcut = x
        x = self.norm1(x)
        x = self.att(x, cache, trace, head_mask)  # (b, T, emb); NEW: cache, trace, head_mask
        x = self.drop_shortcut(x)
        x = x + shortcut
        record(RESID_MID, x)  # NEW (trace): the residual stream between the two sub-blocks

        # Shortcut connection around the feed-forward sub-block
        shortcut = x
        x = self.norm2(x)
        x = self.ff(x)
        record(FF_OUT, x)  # NEW (trace): what the feed-forward adds to the residual stream
        x = self.drop_shortcut(x)
        x = x + shortcut
        record(RESIDUAL, x)  # NEW (trace)
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
        start = cache.length if cache is not None else 0  # NEW (KV cache): positions already cached
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
        if last_only:  # NEW (speed): generation needs the last position's logits only
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
