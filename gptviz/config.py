"""Model configuration: the source's seven keys plus an optional tied output head."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

#: The keys of the source's plain configuration dict, in the source's order.
SOURCE_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT model, exactly as the source's ``GPT_CONFIG_124M`` dict describes it.

    ``tie_weights`` is gptviz's addition: the source keeps ``out_head`` separate from
    ``tok_emb``; the released GPT-2 models share one matrix between them.
    """

    vocab_size: int = 50257  # GPT-2 BPE vocabulary
    context_length: int = 1024  # positions
    emb_dim: int = 768  # embedding width
    n_heads: int = 12  # attention heads
    n_layers: int = 12  # transformer blocks
    drop_rate: float = 0.1  # dropout everywhere
    qkv_bias: bool = False  # bias on the query/key/value projections
    tie_weights: bool = False  # out_head shares tok_emb's weight

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if self.emb_dim % self.n_heads:
            raise ValueError(
                f"emb_dim must be divisible by n_heads: {self.emb_dim} is not a multiple of {self.n_heads}"
            )
        rate = self.drop_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ValueError(f"drop_rate must be a number with 0 <= drop_rate < 1, got {rate!r}")
        for name in ("qkv_bias", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GPTConfig":
        """Build from the source's plain dict (``tie_weights`` may be given too)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown configuration key(s): {', '.join(unknown)}; expected {sorted(known)}")
        missing = [k for k in SOURCE_KEYS if k not in d]
        if missing:
            raise ValueError(f"missing configuration key(s): {', '.join(missing)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """The source's plain dict; ``tie_weights`` is added only when it is True,
        so ``GPTConfig.from_dict(d).to_dict() == d`` for the source's own dicts."""
        d = {k: getattr(self, k) for k in SOURCE_KEYS}
        if self.tie_weights:
            d["tie_weights"] = True
        return d

    def replace(self, **changes: Any) -> "GPTConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def coerce(cls, cfg: "GPTConfig | Mapping[str, Any]") -> "GPTConfig":
        """Accept either a GPTConfig or the source's dict."""
        return cfg if isinstance(cfg, GPTConfig) else cls.from_dict(cfg)


def _gpt2(emb_dim: int, n_heads: int, n_layers: int) -> GPTConfig:
    # The released GPT-2 models: biased q/k/v projections and a tied output head.
    return GPTConfig(emb_dim=emb_dim, n_heads=n_heads, n_layers=n_layers, qkv_bias=True, tie_weights=True)


#: Named configurations. "seed-124M" is the source's GPT_CONFIG_124M (163,009,536 parameters).
PRESETS: dict[str, GPTConfig] = {
    "seed-124M": GPTConfig(),
    "gpt2": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 16, 24),
    "gpt2-large": _gpt2(1280, 20, 36),
    "gpt2-xl": _gpt2(1600, 25, 48),
}
