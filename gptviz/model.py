"""The GPT model of the source material (chapter 4), module for module.

``GELU``, ``FeedForward``, ``MultiHeadAttention``, ``LayerNorm``, ``TransformerBlock`` and
``GPTModel`` keep the book's names, arguments and arithmetic. Three additions never change
its numbers; each is marked ``# NEW`` where it enters the forward pass:

* ``cache``: a :class:`~gptviz.kv_cache.KVCache`, so a generation step runs only the new token(s);
* ``trace``: a :class:`~gptviz.trace.Trace` that records intermediate tensors as they are made;
* ``head_mask``: switches attention heads off (ablation).

Without them, ``GPTModel(cfg)(in_idx)`` is the source's forward.

Two more, for speed and half precision, also marked ``# NEW``:

* **speed**: ``Linear`` is ``nn.Linear`` with a faster CPU kernel, and the three attention
  projections share one buffer so they run as one product (:meth:`GPTModel.optimize_layout_`).
  Both live in :mod:`gptviz.kernels`. Names, shapes, values, ``state_dict`` keys and parameter
  counts stay the book's; the results agree with the book's kernels
  (:func:`~gptviz.kernels.book_kernels`) to float32 rounding.
* **float16**: ``LayerNorm`` normalises in float32 and casts back (a float16 variance
  overflows at 65504); everything else runs as written.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from .config import GPTConfig
from .kernels import Linear, fuse_rows_, hooked, joined_rows, linear
from .kv_cache import KVCache, LayerKVCache
from .trace import ATTN_SCORES, ATTN_WEIGHTS, CONTEXT, FF_OUT, KEYS, QUERIES, RESID_MID, RESIDUAL, VALUES, LayerTrace, Trace

__all__ = ["GELU", "FeedForward", "MultiHeadAttention", "LayerNorm", "TransformerBlock", "GPTModel"]


class GELU(nn.Module):
    """Gaussian error linear unit, tanh approximation (as GPT-2 uses)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))))


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            # NEW (speed): Linear is nn.Linear with a faster CPU kernel (gptviz.kernels)
            Linear(cfg.emb_dim, 4 * cfg.emb_dim),  # (b, T, emb) -> (b, T, 4*emb)
            GELU(),
            Linear(4 * cfg.emb_dim, cfg.emb_dim),  # (b, T, 4*emb) -> (b, T, emb)
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
        self.W_query = Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = Linear(d_out, d_out)  # combines the heads' outputs
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

        qkv = self._fused_qkv(x)  # NEW (speed): the three products below as one, or None
        if qkv is not None:
            queries, keys, values = qkv.split(self.d_out, dim=-1)  # (b, T, d_out) each
        else:
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
        padding = getattr(cache, "padding", None)  # NEW (batching): (b, T_k) keys a row does not have
        if padding is not None:
            attn_scores.masked_fill_(padding[:, None, None, :], -torch.inf)
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

    # NEW (speed): W_query, W_key and W_value as one product --------------------------------
    def fuse_qkv_(self) -> "MultiHeadAttention":
        """Put ``W_query``, ``W_key`` and ``W_value`` into one ``(3·d_out, d_in)`` buffer (their
        weights become row blocks of it: values, names and shapes unchanged). Idempotent."""
        with torch.no_grad():
            fuse_rows_([self.W_query, self.W_key, self.W_value])
        return self

    def _fused_qkv(self, x: torch.Tensor) -> torch.Tensor | None:
        """``torch.cat([W_query(x), W_key(x), W_value(x)], -1)`` as one product, when the three
        weights lie in one buffer (:meth:`fuse_qkv_`); None where each module must be called:
        a forward hook watches them (the shape tracer), or gradients flow to the weights."""
        linears = (self.W_query, self.W_key, self.W_value)
        if hooked(*linears) or (torch.is_grad_enabled() and self.W_query.weight.requires_grad):
            return None
        weight = joined_rows([lin.weight for lin in linears])  # (3·d_out, d_in) view, or None
        if weight is None:
            return None
        bias = None
        if self.W_query.bias is not None:
            bias = joined_rows([lin.bias for lin in linears])
            if bias is None:
                bias = torch.cat([lin.bias for lin in linears])
        return linear(x, weight, bias)  # (b, T, 3·d_out)


class LayerNorm(nn.Module):
    def __init__(self, emb_dim: int) -> None:
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype in (torch.float16, torch.bfloat16):  # NEW (float16): normalise half inputs in float32
            x = x.float()
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)  # biased variance, as GPT-2
        norm_x = (x - mean) / torch.sqrt(var + self.eps)
        return (self.scale * norm_x + self.shift).to(dtype)  # NEW (float16): back to x's dtype


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
        self.out_head = Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:  # GPT-2's weight tying: one Parameter for both
            self.out_head.weight = self.tok_emb.weight
        self.optimize_layout_()  # NEW (speed): the fastest memory layout, same numbers
        self.register_load_state_dict_post_hook(_relayout_after_load)  # NEW (speed): and after loading

    def forward(
        self,
        in_idx: torch.Tensor,
        cache: KVCache | None = None,
        *,
        trace: Trace | None = None,
        head_mask: torch.Tensor | None = None,
        last_only: bool | torch.Tensor = False,
        positions: torch.Tensor | None = None,
        head: bool = True,
    ) -> torch.Tensor:
        """Logits ``(b, T, vocab_size)`` for token ids ``(b, T)``.

        ``cache``: a :class:`KVCache`; ``in_idx`` then holds only the positions after those
        already cached. ``trace``: a :class:`Trace` to record into. ``head_mask``:
        ``(n_layers, n_heads)``, 0 switches a head off. ``last_only``: compute logits for
        the last position only, ``(b, 1, vocab_size)`` (what generation needs); or a ``(b,)``
        tensor: each row's own last position (rows right-padded to one length). ``positions``:
        ``(b, T)`` absolute positions per row, for rows that continue caches of different lengths
        (a :class:`~gptviz.kv_cache.BatchKVCache`: several visitors' steps in one forward).
        ``head=False``: stop before ``final_norm`` and return the last block's residual stream
        ``(b, T, emb)`` (after ``last_only``): the caller runs :meth:`logit_lens` on it together
        with other rows, so one read of the output head serves the prediction and the logit lens.
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
        if positions is None:
            positions = torch.arange(start, start + seq_len, device=in_idx.device)  # (T,)
        pos_embeds = self.pos_emb(positions)  # (T, emb), or (b, T, emb) for batched visitors (NEW)
        x = tok_embeds + pos_embeds  # (b, T, emb)
        x = self.drop_emb(x)
        for i, block in enumerate(self.trf_blocks):
            x = block(
                x,
                None if cache is None else cache.layers[i],
                None if trace is None else trace.layer(i),
                None if head_mask is None else head_mask[i],
            )
        if isinstance(last_only, torch.Tensor):  # NEW (batching): each row's last real position
            x = x[torch.arange(batch_size, device=x.device), last_only][:, None]  # (b, 1, emb)
        elif last_only:  # NEW (speed): generation needs the last position's logits only
            x = x[:, -1:, :]  # (b, 1, emb)
        if not head:  # NEW (speed): the head runs later, in one product with the lens rows
            return x  # (b, T, emb): the residual stream after the last block
        x = self.final_norm(x)
        logits = self.out_head(x)  # (b, T, vocab)
        return logits

    def logit_lens(self, residual: torch.Tensor) -> torch.Tensor:
        """What the model would predict from a residual stream: ``out_head(final_norm(x))``."""
        return self.out_head(self.final_norm(residual))

    # NEW (speed) -------------------------------------------------------------------------
    def optimize_layout_(self) -> "GPTModel":
        """Store the weights as a step reads them fastest: every matrix contiguous in
        ``nn.Linear``'s ``(out, in)`` (what :func:`linear`'s kernel reads fastest, also in float16
        and bfloat16), ``W_query``/``W_key``/``W_value`` in one buffer (one product); values,
        names, shapes and tying unchanged. Idempotent.

        Runs by itself after ``GPTModel(cfg)``, ``load_state_dict`` (also with ``assign=True``)
        and ``.to(...)``/``.half()``/``.cuda()``; call it after replacing a Parameter by hand.
        Each matrix is copied once while it is re-laid (briefly one more matrix of memory).
        """
        if self.tok_emb.weight.device.type == "meta":
            return self
        with torch.no_grad():
            if self.cfg.tie_weights and self.out_head.weight is not self.tok_emb.weight:
                a, b = self.out_head.weight, self.tok_emb.weight
                if (a.data_ptr(), a.shape, a.stride(), a.dtype) == (b.data_ptr(), b.shape, b.stride(), b.dtype):
                    self.out_head.weight = self.tok_emb.weight  # assign=True made two Parameters of one tensor
            for block in self.trf_blocks:
                block.att.fuse_qkv_()
                for lin in (block.att.out_proj, block.ff.layers[0], block.ff.layers[2]):
                    lin.weight.data = lin.weight.contiguous()
            self.out_head.weight.data = self.out_head.weight.contiguous()
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> "GPTModel":
        super()._apply(fn, recurse)  # .to(), .half(), .cuda(), ... convert each tensor alone
        return self.optimize_layout_()  # NEW (speed): the layout that fits the new dtype/device

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # copy.deepcopy and unpickling copy each tensor alone
        self.optimize_layout_()  # NEW (speed): lay the copies out again

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_emb.weight.dtype


def _ignore(name: str, tensor: torch.Tensor) -> None:
    """Stands in for ``trace.record`` when nothing is traced."""


def _relayout_after_load(module: "GPTModel", incompatible_keys: Any) -> None:
    """load_state_dict(..., assign=True) puts the checkpoint's tensors in: lay them out again."""
    module.optimize_layout_()
