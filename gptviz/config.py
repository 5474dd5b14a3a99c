"""Model configuration: the source's seven keys plus an optional tied output head."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

#: The keys of the source's plain configuration dict, in the source's order.
SOURCE_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")
#: Every field of a :class:`GPTConfig` (the source's keys, then gptviz's ``tie_weights``): the
#: one list the parameter form, lesson files and links use.
CONFIG_FIELDS = (*SOURCE_KEYS, "tie_weights")
#: The released GPT-2 models, smallest first (their configurations are in :data:`PRESETS`).
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


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


# --------------------------------------------------------------------------- form input

_INT_FIELDS = SOURCE_KEYS[:5]  # vocab_size … n_layers


def _whole(name: str, value: Any) -> int:
    """An integer from a UI number box (``768``, ``768.0``); ``ValueError`` naming the field otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{name} is required")
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if not number.is_integer():
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def config_from_fields(
    vocab_size: Any,
    context_length: Any,
    emb_dim: Any,
    n_heads: Any,
    n_layers: Any,
    drop_rate: Any,
    qkv_bias: Any,
    tie_weights: Any,
) -> GPTConfig:
    """A :class:`GPTConfig` from the UI's raw field values, or a ``ValueError`` whose message
    names the field (integral floats such as ``768.0`` are accepted; ``768.5`` is not)."""
    ints = {name: _whole(name, value) for name, value in zip(_INT_FIELDS, (vocab_size, context_length, emb_dim,
                                                                          n_heads, n_layers))}
    if drop_rate is None or (isinstance(drop_rate, str) and not drop_rate.strip()):
        raise ValueError("drop_rate is required")
    try:
        rate = float(drop_rate)
    except (TypeError, ValueError):
        raise ValueError(f"drop_rate must be a number with 0 <= drop_rate < 1, got {drop_rate!r}") from None
    return GPTConfig(**ints, drop_rate=rate, qkv_bias=qkv_bias, tie_weights=tie_weights)
