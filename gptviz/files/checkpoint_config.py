"""What loading a checkpoint shares: the errors it raises, the :class:`WeightsSource` a loaded
model carries, and the configuration of a checkpoint read from its ``config.json`` or its tensors.

Configuration from the tensors (:func:`config_from_state_dict`, :func:`config_from_hf_shapes`):
vocabulary and width from the token embedding, context from the position embedding, blocks
from the block indices, ``qkv_bias`` from the query bias, a tied head when ``out_head.weight``
is absent or equal to ``tok_emb.weight``. ``n_heads`` is not in any shape: it comes from the
``n_heads`` argument, else from the released GPT-2 of the same width (:data:`GPT2_HEADS`),
else :class:`NeedsHeadsError` asks for it.

:mod:`gptviz.files.weights` re-exports every public name here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..config import PRESETS, GPTConfig
from ..params import count_params
from ..settings import SEED

__all__ = [
    "GPT2_HEADS",
    "WeightsSource",
    "WeightsError",
    "CheckpointError",
    "NeedsHeadsError",
    "TooLargeError",
    "config_from_hf",
    "config_from_hf_shapes",
    "config_from_state_dict",
    "weights_source",
]

#: Heads of the released GPT-2 of each width: the ``n_heads`` inferred when not given.
GPT2_HEADS: dict[int, int] = {
    PRESETS[n].emb_dim: PRESETS[n].n_heads for n in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
}  # 768 → 12, 1024 → 16, 1280 → 20, 1600 → 25


class WeightsError(RuntimeError):
    """Weights could not be loaded: unknown name, download failure, missing or refused file."""


class CheckpointError(WeightsError, ValueError):
    """The checkpoint does not fit GPT-2: missing, unexpected or wrongly shaped tensors, or a bad config."""


class NeedsHeadsError(CheckpointError):
    """The tensors fit, but their width is no released GPT-2's: ``n_heads`` must be given."""

    def __init__(self, message: str, emb_dim: int | None = None) -> None:
        super().__init__(message)
        self.emb_dim = emb_dim


class TooLargeError(WeightsError):
    """An upload over the size limit, or a model over the memory limit (the message gives both sizes)."""


@dataclass(frozen=True, kw_only=True)
class WeightsSource:
    """Where a model's weights came from: what the Model view's card shows.

    ``kind``: ``"hub"`` (a Hub repository in GPT-2 layout), ``"book"`` (the book companion's
    converted file), ``"file"`` (a local file or directory, an upload) or ``"random"``.
    ``name``: what was asked for (``"gpt2"``, ``"book:gpt2-small-124M"``, ``"hf:owner/name"``,
    the file's or directory's name without its folders, ``"random"``). ``revision``: the Hub
    commit (the snapshot folder of huggingface_hub's cache), ``None`` when unknown.
    ``sha256``: of the weights file, for ``"file"`` only (hub files are identified by their
    revision). ``seed``: for ``"random"``. No field holds a server path.
    """

    kind: str
    name: str
    repo_id: str | None = None
    revision: str | None = None
    filename: str | None = None
    sha256: str | None = None
    config: GPTConfig | None = None
    seed: int | None = None

    @property
    def sha256_prefix(self) -> str | None:
        """The first 12 hex digits of :attr:`sha256` (what a card shows)."""
        return self.sha256[:12] if self.sha256 else None

    @classmethod
    def random(cls, config: GPTConfig, seed: int = SEED) -> "WeightsSource":
        """For random weights: ``torch.manual_seed(seed)`` before ``GPTModel(config)``."""
        return cls(kind="random", name="random", config=config, seed=seed)


def weights_source(model: torch.nn.Module) -> WeightsSource | None:
    """``model.weights_source`` (set by :func:`load_pretrained` and :func:`load_upload`), else None."""
    source = getattr(model, "weights_source", None)
    return source if isinstance(source, WeightsSource) else None



# --------------------------------------------------------------------------- configuration

# config.json fields that would change the computation, with GPT-2's values (missing = GPT-2's).
_GPT2_ONLY: dict[str, tuple[Any, ...]] = {
    "model_type": ("gpt2",),
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # both: the tanh approximation
    "layer_norm_epsilon": (1e-5,),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
}


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """A :class:`GPTConfig` from a Hugging Face GPT-2 ``config.json`` dict.

    Shape from ``n_embd``, ``n_head``, ``n_layer``, ``n_positions`` and ``vocab_size``;
    ``qkv_bias=True`` and a tied head, as GPT-2. ``drop_rate`` is the checkpoint's
    ``resid_pdrop`` (0.1 when absent; the released models use 0.1 for all three of
    their dropout fields, and dropout is off in eval mode anyway).
    """
    missing = [k for k in ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size") if k not in hf]
    if missing:
        raise CheckpointError(f"config.json lacks {', '.join(missing)}")
    for key, allowed in _GPT2_ONLY.items():
        if key in hf and hf[key] not in allowed:
            raise CheckpointError(f"config.json has {key}={hf[key]!r}; gptviz's GPT-2 needs {allowed[0]!r}")
    try:
        cfg = GPTConfig(
            vocab_size=hf["vocab_size"],
            context_length=hf["n_positions"],
            emb_dim=hf["n_embd"],
            n_heads=hf["n_head"],
            n_layers=hf["n_layer"],
            drop_rate=hf.get("resid_pdrop", 0.1),
            qkv_bias=True,
            tie_weights=True,
        )
    except ValueError as e:
        raise CheckpointError(
            f"config.json: {e} (emb_dim is n_embd, n_heads n_head, n_layers n_layer, context_length n_positions, "
            "drop_rate resid_pdrop)"
        ) from e
    if hf.get("n_inner") not in (None, 4 * cfg.emb_dim):
        raise CheckpointError(f"config.json has n_inner={hf['n_inner']}; gptviz's feed-forward is 4 * n_embd wide")
    return cfg


def _heads(emb_dim: int, n_heads: int | None) -> int:
    if n_heads is not None:
        return n_heads
    if emb_dim in GPT2_HEADS:
        return GPT2_HEADS[emb_dim]
    widths = ", ".join(f"{e} → {h}" for e, h in GPT2_HEADS.items())
    raise NeedsHeadsError(
        f"n_heads cannot be read from the tensors and emb_dim={emb_dim} is no released GPT-2's width "
        f"({widths}): give the number of attention heads, n_heads=… (e.g. load_pretrained(path, n_heads=…))",
        emb_dim,
    )


def _matrix(shapes: Mapping[str, tuple[int, ...]], key: str, role: str, hint: str = "") -> tuple[int, int]:
    shape = shapes.get(key)
    if shape is None:
        raise CheckpointError(f"missing tensor(s): {key} ({role}){hint}")
    if len(shape) != 2:
        raise CheckpointError(f"{key} has shape {tuple(shape)}, expected a matrix ({role})")
    return shape[0], shape[1]


def _n_layers(keys: Any, prefix: str) -> int:
    """Blocks from the indices of ``{prefix}{i}.…`` names (a gap shows up later as missing tensors)."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    found = [int(m.group(1)) for k in keys if (m := pattern.match(k))]
    if not found:
        raise CheckpointError(f"no transformer blocks: no tensor is named {prefix}{{i}}.…")
    return max(found) + 1


def _config(
    vocab: int, ctx: int, emb: int, n_heads: int | None, n_layers: int, qkv_bias: bool, tied: bool
) -> GPTConfig:
    heads = _heads(emb, n_heads)  # NeedsHeadsError (a ValueError too) before the try below
    try:
        return GPTConfig(vocab_size=vocab, context_length=ctx, emb_dim=emb, n_heads=heads,
                         n_layers=n_layers, drop_rate=0.1, qkv_bias=qkv_bias, tie_weights=tied)  # fmt: skip
    except ValueError as e:  # n_heads not a divisor of emb_dim, not a positive integer
        raise CheckpointError(f"configuration inferred from the tensors: {e} (n_heads={heads!r})") from e


def config_from_hf_shapes(shapes: Mapping[str, tuple[int, ...]], n_heads: int | None = None) -> GPTConfig:
    """The :class:`GPTConfig` of Hugging Face GPT-2 tensors, from their shapes alone (no ``config.json``).

    ``vocab_size`` and ``emb_dim`` from ``wte.weight``, ``context_length`` from ``wpe.weight``,
    ``n_layers`` from the ``h.{i}`` indices (names with or without ``transformer.``);
    ``qkv_bias=True`` and a tied head, as GPT-2; ``drop_rate`` 0.1. ``n_heads``: the argument,
    else :data:`GPT2_HEADS` by width, else :class:`NeedsHeadsError`. The layout is checked when loading.
    """
    bare = {k.removeprefix("transformer."): tuple(v) for k, v in shapes.items()}
    vocab, emb = _matrix(bare, "wte.weight", "the token embedding")
    ctx, _ = _matrix(bare, "wpe.weight", "the position embedding")
    return _config(vocab, ctx, emb, n_heads, _n_layers(bare, "h."), True, True)


def config_from_state_dict(state: Mapping[str, torch.Tensor], n_heads: int | None = None) -> GPTConfig:
    """The :class:`GPTConfig` of a state dict in the book's names (``GPTModel.state_dict()``).

    ``vocab_size`` and ``emb_dim`` from ``tok_emb.weight``, ``context_length`` from
    ``pos_emb.weight``, ``n_layers`` from the ``trf_blocks.{i}`` indices, ``qkv_bias`` from the
    presence of ``trf_blocks.0.att.W_query.bias``, ``tie_weights`` from ``out_head.weight``
    being absent or equal to ``tok_emb.weight``; ``drop_rate`` 0.1 (dropout is off in eval
    mode). ``n_heads``: the argument, else :data:`GPT2_HEADS` by width, else
    :class:`NeedsHeadsError`. The names and shapes are checked when loading.
    """
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    hint = ""
    if "tok_emb.weight" not in shapes:
        prefixed = next((k.removesuffix("tok_emb.weight") for k in shapes if k.endswith(".tok_emb.weight")), None)
        if prefixed is not None:  # e.g. "_orig_mod." (torch.compile) or "module." (DistributedDataParallel)
            hint = f"; the names carry a prefix {prefixed!r}: save the state_dict of the model without it"
        elif any(k.removeprefix("transformer.") == "wte.weight" for k in shapes):
            hint = "; these are Hugging Face GPT-2 names: save them as .safetensors with their config.json"
    vocab, emb = _matrix(shapes, "tok_emb.weight", "the token embedding", hint)
    ctx, _ = _matrix(shapes, "pos_emb.weight", "the position embedding")
    tok, head = state["tok_emb.weight"], state.get("out_head.weight")
    tied = head is None or (head.shape == tok.shape and head.dtype == tok.dtype and torch.equal(head, tok))
    qkv_bias = "trf_blocks.0.att.W_query.bias" in shapes
    return _config(vocab, ctx, emb, n_heads, _n_layers(shapes, "trf_blocks."), qkv_bias, tied)

# --------------------------------------------------------------------------- memory


def model_bytes(cfg: GPTConfig, dtype: torch.dtype) -> int:
    """Bytes a model of ``cfg`` holds: its parameters in ``dtype`` (the tied head counted once,
    :func:`~gptviz.params.count_params`) plus one causal mask per block (context², 1-byte bool)."""
    return count_params(cfg) * dtype.itemsize + cfg.n_layers * cfg.context_length**2


def _check_memory(cfg: GPTConfig, dtype: torch.dtype, limit: int | None, label: str) -> None:
    if limit is not None and (need := model_bytes(cfg, dtype)) > limit:
        raise TooLargeError(
            f"{label}: the model needs {need:,} bytes ({need / 1e9:.2f} GB) in {str(dtype).removeprefix('torch.')}, "
            f"over the limit of {limit:,} bytes ({limit / 1e9:.2f} GB)"
        )


class _Labelled:
    """``with _Labelled(label):`` prefixes the message of a CheckpointError raised inside with ``label``."""

    def __init__(self, label: str) -> None:
        self.label = label

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, e: BaseException | None, tb: Any) -> bool:
        if isinstance(e, CheckpointError) and not str(e).startswith(f"{self.label}: "):
            e.args = (f"{self.label}: {e}", *e.args[1:])
        return False
