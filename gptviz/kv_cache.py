"""The KV cache: keys and values of the positions processed so far, per layer.

Passed into ``GPTModel.forward`` (never kept inside the modules), so one read-only model
serves many visitors, each with a cache of their own.
"""

from __future__ import annotations

import torch

from .config import GPTConfig

__all__ = ["LayerKVCache", "KVCache", "BatchKVCache"]


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

    ``KVCache.for_config(model.cfg)`` makes an empty one; pass it to ``model(ids, cache)``
    repeatedly with the *new* ids only. Logits equal those of the full recompute.
    """

    def __init__(self, n_layers: int, context_length: int, chunk: int = 128) -> None:
        self.layers = [LayerKVCache(context_length, chunk) for _ in range(n_layers)]
        self.context_length = context_length

    @classmethod
    def for_config(cls, cfg: GPTConfig, chunk: int = 128) -> "KVCache":
        """An empty cache for a model of configuration ``cfg`` (``KVCache.for_config(model.cfg)``)."""
        return cls(cfg.n_layers, cfg.context_length, chunk)

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


class BatchLayerKVCache:
    """One layer of several visitors' caches, continued together by one batched step.

    :meth:`update` appends each row's new keys and values to that row's own cache and returns
    them all padded to the longest, ``(b, n_heads, T_max, head_dim)``; :attr:`padding` then marks
    ``(b, T_max)`` the keys a row does not have, which attention masks out.
    """

    def __init__(self, layers: list[LayerKVCache]) -> None:
        self.layers = layers
        self.padding: torch.Tensor | None = None

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [layer.update(k_new[i : i + 1], v_new[i : i + 1]) for i, layer in enumerate(self.layers)]
        lengths = torch.tensor([k.shape[2] for k, _ in rows], device=k_new.device)
        b, h, _, d = k_new.shape
        t_max = int(lengths.max())
        keys, values = k_new.new_zeros((b, h, t_max, d)), v_new.new_zeros((b, h, t_max, d))
        for i, (k, v) in enumerate(rows):
            keys[i, :, : k.shape[2]] = k[0]
            values[i, :, : v.shape[2]] = v[0]
        self.padding = torch.arange(t_max, device=k_new.device)[None, :] >= lengths[:, None]  # (b, T_max)
        return keys, values


class BatchKVCache:
    """Several visitors' :class:`KVCache`\\ s stepped by one forward (each row continues its own cache).

    Pass it with the rows' ``positions`` to ``GPTModel.forward``; each underlying cache grows
    exactly as a solo step would grow it.
    """

    def __init__(self, caches: list[KVCache]) -> None:
        self.caches = caches
        self.layers = [BatchLayerKVCache([c.layers[i] for c in caches]) for i in range(len(caches[0].layers))]

    @property
    def length(self) -> int:
        """The longest row's cached positions (for the context-length check)."""
        return max(c.length for c in self.caches)

