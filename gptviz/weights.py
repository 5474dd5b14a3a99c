"""Weights for :class:`~gptviz.model.GPTModel`: the released GPT-2 models, the book's own files,
and checkpoints readers trained themselves.

What :func:`load_pretrained` reads:

* a name of :data:`PRETRAINED_NAMES` (the visitors' allow-list), downloaded through
  huggingface_hub into its standard cache (``HF_HOME``; a cached copy is used offline):

  - ``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl`` (``openai-community/<name>``) and
    ``distilgpt2`` (``distilbert/distilgpt2``, 6 blocks, 82M parameters): ``model.safetensors``
    and ``config.json`` in Hugging Face GPT-2 layout;
  - ``book:gpt2-small-124M``, ``book:gpt2-medium-355M``, ``book:gpt2-large-774M``,
    ``book:gpt2-xl-1558M``: the book companion's conversion of the same weights to the book's
    own names (``rasbt/gpt2-from-scratch-pytorch``, ``gpt2-small-124M.pth`` …), read as a
    ``.pth`` below;

* ``"hf:owner/name"`` (optionally ``"hf:owner/name@revision"``): any Hub repository in GPT-2
  layout. This prefix is the operator's explicit way to the Hub (Python, ``GPTVIZ_WEIGHTS``);
  a plain ``"owner/name"`` is a path, never a Hub id;

* a local path: a directory holding ``model.safetensors`` and ``config.json``; a
  ``.safetensors`` file (with ``config.json`` beside it, or else its configuration inferred from
  its tensors, which may carry Hugging Face or the book's names); or a ``.pth`` / ``.pt`` file
  saved the book's way, ``torch.save(model.state_dict(), "model.pth")`` or
  ``torch.save({"model_state_dict": …, "optimizer_state_dict": …}, …)`` (the optimizer's state is
  ignored). ``.pth`` files are read with ``torch.load(weights_only=True)``, PyTorch's restricted
  unpickler: a file whose pickle asks for anything beyond tensors is refused and nothing in it
  runs. Other pickles (``.bin``, ``.ckpt``, ``.pkl``) are refused unread.

:func:`load_upload` is the visitors' door for one uploaded file (size limit first, then
``.safetensors`` or ``.pth`` / ``.pt``, configuration always from the tensors, nothing beside
the file read).

Hugging Face names → the book's names (``h.{i}`` is block ``i``):

=========================  ==========================================================
``wte`` / ``wpe``          ``tok_emb`` / ``pos_emb`` (``out_head`` is tied to ``tok_emb``)
``h.{i}.ln_1`` / ``ln_2``  ``trf_blocks.{i}.norm1`` / ``norm2`` (weight → scale, bias → shift)
``h.{i}.attn.c_attn``      split into ``att.W_query`` / ``W_key`` / ``W_value``
``h.{i}.attn.c_proj``      ``att.out_proj``
``h.{i}.mlp.c_fc``         ``ff.layers.0``
``h.{i}.mlp.c_proj``       ``ff.layers.2``
``ln_f``                   ``final_norm``
=========================  ==========================================================

GPT-2 stores its projections as ``Conv1D`` with weight shape ``(in, out)``, the transpose of
``nn.Linear``'s ``(out, in)``. The book's ``MultiHeadAttention`` keeps its causal ``mask`` as a
persistent buffer, so its state dicts carry ``trf_blocks.{i}.att.mask``: checked (ones strictly
above the diagonal) and dropped.

Configuration from the tensors (:func:`config_from_state_dict`, :func:`config_from_hf_shapes`):
vocabulary and width from the token embedding, context from the position embedding, blocks
from the block indices, ``qkv_bias`` from the query bias, a tied head when ``out_head.weight``
is absent or equal to ``tok_emb.weight``. ``n_heads`` is not in any shape: it comes from the
``n_heads`` argument, else from the released GPT-2 of the same width (:data:`GPT2_HEADS`),
else :class:`NeedsHeadsError` asks for it.

Every loaded model carries ``model.weights_source``, a :class:`WeightsSource` saying where its
weights came from (Hub repo and revision, or file name and sha256, and the configuration).

Security: only the operator passes paths and ``hf:`` ids (Python, an environment variable).
Anything a visitor chose must pass :func:`is_allowed_name` first; a string that is an allowed
name always means the Hub model. A visitor's upload goes through :func:`load_upload` only.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import stat
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.utils import silent_tqdm
from safetensors import SafetensorError, safe_open

from .config import PRESETS, GPTConfig
from .model import GPTModel, MultiHeadAttention
from .params import count_params
from .settings import SEED, Settings, select_device

__all__ = [
    "PRETRAINED_NAMES",
    "RELEASED_NAMES",
    "BOOK_NAMES",
    "GPT2_HEADS",
    "Pretrained",
    "WeightsSource",
    "WeightsError",
    "CheckpointError",
    "NeedsHeadsError",
    "TooLargeError",
    "is_allowed_name",
    "hub_repo_id",
    "pretrained_info",
    "pretrained_config",
    "config_from_hf",
    "config_from_hf_shapes",
    "config_from_state_dict",
    "estimated_bytes",
    "load_pretrained",
    "load_upload",
    "weights_source",
]

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
BOOK_REPO = "rasbt/gpt2-from-scratch-pytorch"
HF_PREFIX = "hf:"  # the operator's explicit way to any Hub repository
_PTH_SUFFIXES = (".pth", ".pt")  # read with torch.load(weights_only=True)
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pkl")  # refused unread
_ALL_PICKLES = _PICKLE_SUFFIXES + _PTH_SUFFIXES


@dataclass(frozen=True)
class Pretrained:
    """One entry of the allow-list: where its file lies and the model it holds."""

    name: str  # as visitors see and choose it
    repo_id: str  # Hugging Face Hub repository
    filename: str  # the weights file in it
    layout: str  # "hf": model.safetensors + config.json; "book": the book's state dict (.pth)
    config: GPTConfig  # what the file holds (estimated_bytes works before downloading)


def _released(name: str, repo_id: str, cfg: GPTConfig) -> Pretrained:
    return Pretrained(name, repo_id, WEIGHTS_FILE, "hf", cfg)


def _book(size: str, preset: str) -> Pretrained:
    # The book's conversion copies wte into out_head: equal tensors, loaded tied.
    return Pretrained(f"book:gpt2-{size}", BOOK_REPO, f"gpt2-{size}.pth", "book", PRESETS[preset])


_PRETRAINED: dict[str, Pretrained] = {
    p.name: p
    for p in (
        *(_released(n, f"openai-community/{n}", PRESETS[n]) for n in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")),
        _released("distilgpt2", "distilbert/distilgpt2", PRESETS["gpt2"].replace(n_layers=6)),
        _book("small-124M", "gpt2"),
        _book("medium-355M", "gpt2-medium"),
        _book("large-774M", "gpt2-large"),
        _book("xl-1558M", "gpt2-xl"),
    )
}
#: The Hugging Face GPT-2 checkpoints of the allow-list, in the order the app lists them.
RELEASED_NAMES = tuple(n for n, p in _PRETRAINED.items() if p.layout == "hf")
#: The book companion's converted files (``rasbt/gpt2-from-scratch-pytorch``).
BOOK_NAMES = tuple(n for n, p in _PRETRAINED.items() if p.layout == "book")
#: Everything a visitor may choose: :data:`RELEASED_NAMES` then :data:`BOOK_NAMES`.
PRETRAINED_NAMES = RELEASED_NAMES + BOOK_NAMES
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


def is_allowed_name(name: object) -> bool:
    """True for the names of :data:`PRETRAINED_NAMES` only: the one check visitor input must pass."""
    return isinstance(name, str) and name in _PRETRAINED


def pretrained_info(name: str) -> Pretrained:
    """The allow-list entry of ``name`` (:class:`WeightsError` for any other string)."""
    if not is_allowed_name(name):
        raise WeightsError(f"unknown model name {name!r}: choose one of {', '.join(PRETRAINED_NAMES)}")
    return _PRETRAINED[name]


def hub_repo_id(name: str) -> str:
    """``"gpt2-xl"`` → ``"openai-community/gpt2-xl"``, ``"distilgpt2"`` → ``"distilbert/distilgpt2"``,
    ``"book:gpt2-small-124M"`` → ``"rasbt/gpt2-from-scratch-pytorch"``."""
    return pretrained_info(name).repo_id


def pretrained_config(name: str) -> GPTConfig:
    """The configuration of an allowed name's model, known before downloading it."""
    return pretrained_info(name).config


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


def estimated_bytes(name_or_cfg: str | GPTConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the loaded model holds: its parameters in ``dtype`` (the tied head counted once,
    :func:`~gptviz.params.count_params`) plus one causal mask per block (context², 1-byte bool).

    ``name_or_cfg`` is a name of :data:`PRETRAINED_NAMES` or a :class:`GPTConfig`. Loading
    briefly needs a little more: the tensor being read and converted (at most one embedding matrix).
    """
    cfg = pretrained_config(name_or_cfg) if isinstance(name_or_cfg, str) else GPTConfig.coerce(name_or_cfg)
    return count_params(cfg) * dtype.itemsize + cfg.n_layers * cfg.context_length**2


def _check_memory(cfg: GPTConfig, dtype: torch.dtype, limit: int | None, label: str) -> None:
    if limit is not None and (need := estimated_bytes(cfg, dtype)) > limit:
        raise TooLargeError(
            f"{label}: the model needs {need:,} bytes ({need / 1e9:.2f} GB) in {str(dtype).removeprefix('torch.')}, "
            f"over the limit of {limit:,} bytes ({limit / 1e9:.2f} GB)"
        )


# --------------------------------------------------------------------------- checkpoint layout


def _hf_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a GPT-2 checkpoint of this shape (names without ``transformer.``)."""
    E, V, P = cfg.emb_dim, cfg.vocab_size, cfg.context_length
    shapes = {"wte.weight": (V, E), "wpe.weight": (P, E), "ln_f.weight": (E,), "ln_f.bias": (E,)}
    for i in range(cfg.n_layers):
        h = f"h.{i}."
        shapes |= {
            h + "ln_1.weight": (E,), h + "ln_1.bias": (E,),
            h + "attn.c_attn.weight": (E, 3 * E), h + "attn.c_attn.bias": (3 * E,),  # Conv1D: (in, out)
            h + "attn.c_proj.weight": (E, E), h + "attn.c_proj.bias": (E,),
            h + "ln_2.weight": (E,), h + "ln_2.bias": (E,),
            h + "mlp.c_fc.weight": (E, 4 * E), h + "mlp.c_fc.bias": (4 * E,),
            h + "mlp.c_proj.weight": (4 * E, E), h + "mlp.c_proj.bias": (E,),
        }  # fmt: skip
    return shapes


def _check_layout(file_shapes: dict[str, tuple[int, ...]], cfg: GPTConfig) -> dict[str, str]:
    """Check names and shapes against the config; return GPT-2 name → the file's name.

    Accepted extras: the ``transformer.`` prefix, the non-parameter ``h.{i}.attn.bias`` /
    ``h.{i}.attn.masked_bias`` buffers (ignored) and ``lm_head.weight`` (checked later to
    equal ``wte``, since gptviz ties the head).
    """
    required = _hf_shapes(cfg)
    expected = required | {"lm_head.weight": (cfg.vocab_size, cfg.emb_dim)}
    buffers = {f"h.{i}.attn.{b}" for i in range(cfg.n_layers) for b in ("bias", "masked_bias")}
    names: dict[str, str] = {}
    unexpected, duplicated, wrong = [], [], []
    for key, shape in file_shapes.items():
        name = key.removeprefix("transformer.")
        if name in buffers:
            continue
        if name not in expected:
            unexpected.append(key)
        elif name in names:
            duplicated.append(f"{names[name]} and {key}")
        elif shape != expected[name]:
            wrong.append(f"{key} has shape {tuple(shape)}, expected {expected[name]}")
        names[name] = key
    missing = [n for n in required if n not in names]
    problems = [
        *([f"missing tensor(s): {', '.join(missing)}"] if missing else []),
        *([f"unexpected tensor(s): {', '.join(unexpected)}"] if unexpected else []),
        *([f"duplicated tensor(s): {'; '.join(duplicated)}"] if duplicated else []),
        *wrong,
    ]
    if problems:
        raise CheckpointError(
            f"checkpoint does not match its config (n_embd={cfg.emb_dim}, n_layer={cfg.n_layers}, "
            f"vocab_size={cfg.vocab_size}, n_positions={cfg.context_length}): " + "; ".join(problems)
        )
    return names


def _seed_state(get: Callable[[str], torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """The GPTModel state dict from GPT-2 tensors (``get`` reads one by its GPT-2 name)."""

    def linear(name: str) -> torch.Tensor:  # Conv1D (in, out) -> nn.Linear (out, in)
        return get(name).t().contiguous()

    wte = get("wte.weight")
    state = {"tok_emb.weight": wte, "pos_emb.weight": get("wpe.weight"), "out_head.weight": wte}
    for i in range(cfg.n_layers):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        # c_attn fuses the three projections: (E, 3E) -> query, key, value rows of (3E, E)
        q_w, k_w, v_w = (w.contiguous() for w in get(h + "attn.c_attn.weight").t().chunk(3, dim=0))
        q_b, k_b, v_b = (b_.clone() for b_ in get(h + "attn.c_attn.bias").chunk(3))
        state |= {
            b + "norm1.scale": get(h + "ln_1.weight"), b + "norm1.shift": get(h + "ln_1.bias"),
            b + "att.W_query.weight": q_w, b + "att.W_query.bias": q_b,
            b + "att.W_key.weight": k_w, b + "att.W_key.bias": k_b,
            b + "att.W_value.weight": v_w, b + "att.W_value.bias": v_b,
            b + "att.out_proj.weight": linear(h + "attn.c_proj.weight"),
            b + "att.out_proj.bias": get(h + "attn.c_proj.bias"),
            b + "norm2.scale": get(h + "ln_2.weight"), b + "norm2.shift": get(h + "ln_2.bias"),
            b + "ff.layers.0.weight": linear(h + "mlp.c_fc.weight"), b + "ff.layers.0.bias": get(h + "mlp.c_fc.bias"),
            b + "ff.layers.2.weight": linear(h + "mlp.c_proj.weight"),
            b + "ff.layers.2.bias": get(h + "mlp.c_proj.bias"),
        }  # fmt: skip
    state |= {"final_norm.scale": get("ln_f.weight"), "final_norm.shift": get("ln_f.bias")}
    return state


def _book_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of ``GPTModel(cfg).state_dict()`` with an untied head (masks are not in it)."""
    with torch.device("meta"):  # shapes only: no storage
        ref = GPTModel(cfg.replace(tie_weights=False))
    return {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def _mask_problem(key: str, mask: torch.Tensor, ctx: int) -> str | None:
    """Why a book ``att.mask`` buffer is not the causal mask of ``ctx`` positions (None when it is)."""
    if tuple(mask.shape) != (ctx, ctx):
        return f"{key} has shape {tuple(mask.shape)}, expected ({ctx}, {ctx}) (the causal mask of context_length={ctx})"
    if not (mask.dtype == torch.bool or mask.is_floating_point()):
        return f"{key} has dtype {str(mask.dtype).removeprefix('torch.')}, expected a float or bool causal mask"
    causal = torch.triu(torch.ones(ctx, ctx, dtype=torch.bool), diagonal=1)
    if not torch.equal(mask.cpu(), causal.to(mask.dtype)):
        return f"{key} is not the causal mask (ones strictly above the diagonal, zeros elsewhere)"
    return None


def _check_book_layout(state: Mapping[str, torch.Tensor], cfg: GPTConfig) -> None:
    """Names and shapes of a book-named state dict against ``cfg``; the masks checked by value.

    Accepted: ``out_head.weight`` absent when the head is tied, and the book's persistent
    ``trf_blocks.{i}.att.mask`` buffers when they hold the causal mask.
    """
    expected = _book_shapes(cfg)
    masks = {f"trf_blocks.{i}.att.mask" for i in range(cfg.n_layers)}
    unexpected, wrong = [], []
    for key, tensor in state.items():
        if key in masks:
            if problem := _mask_problem(key, tensor, cfg.context_length):
                wrong.append(problem)
        elif key not in expected:
            unexpected.append(key)
        elif tuple(tensor.shape) != expected[key]:
            wrong.append(f"{key} has shape {tuple(tensor.shape)}, expected {expected[key]}")
    optional = {"out_head.weight"} if cfg.tie_weights else set()
    missing = [k for k in expected if k not in state and k not in optional]
    problems = [
        *([f"missing tensor(s): {', '.join(missing)}"] if missing else []),
        *([f"unexpected tensor(s): {', '.join(sorted(unexpected))}"] if unexpected else []),
        *wrong,
    ]
    if problems:
        raise CheckpointError(
            f"state dict does not fit the book's GPTModel with the configuration read from it (emb_dim={cfg.emb_dim}, "
            f"n_layers={cfg.n_layers}, vocab_size={cfg.vocab_size}, context_length={cfg.context_length}, "
            f"qkv_bias={cfg.qkv_bias}): " + "; ".join(problems)
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


# --------------------------------------------------------------------------- building


def _build(cfg: GPTConfig, state: dict[str, torch.Tensor], device: torch.device) -> GPTModel:
    """A GPTModel (eval mode) holding ``state`` (the book's names; ``out_head.weight`` is
    ``tok_emb.weight`` itself when the head is tied)."""
    with torch.device("meta"):  # no storage: no time spent on a random init that loading replaces
        model = GPTModel(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_weights:
        model.out_head.weight = model.tok_emb.weight  # assign=True made two Parameters; tie them again
    # The causal masks are non-persistent buffers (in no checkpoint), still on the meta
    # device: take real ones from a small MultiHeadAttention of the same context length.
    mask = MultiHeadAttention(1, 1, cfg.context_length, 0.0, 1).mask.to(device)
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.mask = mask.clone()
    return model.eval()


def _from_book_state(
    state: Mapping[str, torch.Tensor],
    label: str,
    n_heads: int | None,
    device: torch.device,
    dtype: torch.dtype,
    max_model_bytes: int | None,
) -> GPTModel:
    with _Labelled(label):
        cfg = config_from_state_dict(state, n_heads)
        _check_memory(cfg, dtype, max_model_bytes, label)
        _check_book_layout(state, cfg)
    skip = {f"trf_blocks.{i}.att.mask" for i in range(cfg.n_layers)}
    if cfg.tie_weights:
        skip.add("out_head.weight")
    # copy=True: the model owns its memory, never pages of the (memory-mapped) file
    params = {k: v.to(device=device, dtype=dtype, copy=True) for k, v in state.items() if k not in skip}
    if cfg.tie_weights:  # the head is the embedding itself (the book's copy of it is equal, checked above)
        params["out_head.weight"] = params["tok_emb.weight"]
    return _build(cfg, params, device)


def _from_hf_file(
    f: Any, cfg: GPTConfig, label: str, device: torch.device, dtype: torch.dtype
) -> GPTModel:
    """A GPTModel from an open safetensors file in Hugging Face GPT-2 layout."""
    with _Labelled(label):
        names = _check_layout({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, cfg)

    def get(name: str) -> torch.Tensor:
        return f.get_tensor(names[name]).to(device=device, dtype=dtype)

    state = _seed_state(get, cfg)
    if "lm_head.weight" in names and not torch.equal(get("lm_head.weight"), state["tok_emb.weight"]):
        raise CheckpointError(f"{label}: lm_head.weight differs from wte.weight; GPT-2's head is tied")
    return _build(cfg, state, device)


def _load_hf(
    weights: Path, config: Path, label: str, n_heads: int | None, device: torch.device, dtype: torch.dtype
) -> GPTModel:
    """``model.safetensors`` with its ``config.json``."""
    try:
        hf_config = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad UTF-8 or JSON
        raise CheckpointError(f"{config}: not a readable JSON file ({e})") from e
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{config}: expected a JSON object")
    cfg = config_from_hf(hf_config)
    if n_heads is not None and n_heads != cfg.n_heads:
        raise CheckpointError(f"{config}: n_head={cfg.n_heads}, but n_heads={n_heads} was given")
    try:
        with safe_open(weights, framework="pt") as f:
            return _from_hf_file(f, cfg, str(weights), device, dtype)
    except SafetensorError as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from e


def _load_safetensors_alone(
    path: Path,
    label: str,
    n_heads: int | None,
    device: torch.device,
    dtype: torch.dtype,
    max_model_bytes: int | None,
) -> GPTModel:
    """A lone ``.safetensors`` file: the configuration from its tensors (Hugging Face or book names)."""
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            if "tok_emb.weight" in keys:  # the book's names (e.g. save_file(model.state_dict()))
                state = {k: f.get_tensor(k) for k in keys}
                return _from_book_state(state, label, n_heads, device, dtype, max_model_bytes)
            with _Labelled(label):
                cfg = config_from_hf_shapes({k: tuple(f.get_slice(k).get_shape()) for k in keys}, n_heads)
                _check_memory(cfg, dtype, max_model_bytes, label)
            return _from_hf_file(f, cfg, label, device, dtype)
    except SafetensorError as e:
        raise CheckpointError(f"{label}: not a readable safetensors file ({str(e).replace(str(path), label)})") from e


_REFUSED_PICKLE = re.compile(r"(unsupported GLOBAL \S+|Unsupported global: GLOBAL \S+|Unsupported operand \d+)", re.I)


def _torch_load(path: Path, label: str) -> Any:
    """``torch.load`` with PyTorch's restricted unpickler only: tensors, dicts, lists, numbers."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the refusal below says more
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = _REFUSED_PICKLE.search(str(e))
        asks = f" ({found.group(1).replace('Unsupported global: ', '').replace('unsupported ', '')})" if found else ""
        raise CheckpointError(
            f"{label}: refused: the file holds more than tensors{asks}; it was not run. A checkpoint must be saved "
            "as torch.save(model.state_dict(), path) or torch.save({'model_state_dict': model.state_dict(), ...}, "
            "path) — not the whole model or other Python objects"
        ) from e
    except Exception as e:  # a truncated zip, a legacy file with a bad magic number, ...: all "not readable"
        why = str(e).replace(str(path), label)  # an upload's message names no server folder
        raise CheckpointError(f"{label}: not a readable PyTorch checkpoint ({type(e).__name__}: {why})") from e


def _state_dict_of(obj: Any, label: str) -> Mapping[str, torch.Tensor]:
    """The model's state dict in a loaded ``.pth``: the object itself, or its ``"model_state_dict"``."""
    where = ""
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        obj, where = obj["model_state_dict"], "'model_state_dict' "
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{label}: {where or 'the file '}holds a {type(obj).__name__}, not a state dict (names → tensors); "
            "save torch.save(model.state_dict(), path) or a dict with 'model_state_dict'"
        )
    odd = [repr(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        shown = ", ".join(odd[:8]) + (f" and {len(odd) - 8} more" if len(odd) > 8 else "")
        raise CheckpointError(
            f"{label}: {where or 'the file '}is not a state dict: {shown} hold(s) no tensor; expected "
            "torch.save(model.state_dict(), path) or a dict with 'model_state_dict'"
        )
    return obj


def _load_pth(
    path: Path,
    label: str,
    n_heads: int | None,
    device: torch.device,
    dtype: torch.dtype,
    max_model_bytes: int | None = None,
) -> GPTModel:
    state = _state_dict_of(_torch_load(path, label), label)
    return _from_book_state(state, label, n_heads, device, dtype, max_model_bytes)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- where the files are


def _refused_pickle(path: Path) -> WeightsError:
    return WeightsError(
        f"{path}: pickled checkpoints are refused (they can run code); use {WEIGHTS_FILE} or a .pth/.pt state dict"
    )


def _local(path: Path) -> tuple[str, Path, Path | None]:
    """(how to read it, the weights file, config.json or None) of a local checkpoint."""
    suffix = path.suffix.lower()
    if suffix in _PICKLE_SUFFIXES:
        raise _refused_pickle(path)
    if path.is_dir():
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            pickled = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _ALL_PICKLES)
            hint = (
                f" (found only pickled {', '.join(pickled)}; pickles are not looked for in a directory — "
                "pass a .pth/.pt file itself to read it)"
                if pickled
                else ""
            )
            raise WeightsError(f"{path}: no {WEIGHTS_FILE}{hint}")
        config = weights.parent / CONFIG_FILE
        if not config.is_file():
            raise WeightsError(f"{config}: missing (the checkpoint's configuration must lie beside its weights)")
        return "hf", weights, config
    if path.is_file():
        if suffix in _PTH_SUFFIXES:
            return "pth", path, None
        if suffix != ".safetensors":
            raise WeightsError(f"{path}: not a .safetensors, .pth or .pt file")
        config = path.parent / CONFIG_FILE
        return ("hf", path, config) if config.is_file() else ("alone", path, None)
    raise WeightsError(
        f"{str(path)!r} is neither a released model name ({', '.join(PRETRAINED_NAMES)}) nor an existing path "
        f"(a Hugging Face Hub repository is named {HF_PREFIX}owner/name)"
    )


def _download(
    what: str, repo_id: str, filenames: tuple[str, ...], revision: str | None, progress: bool
) -> list[Path]:
    """Files of a Hub repository, from huggingface_hub's cache (downloaded when not there)."""
    try:
        kwargs: dict[str, Any] = {"tqdm_class": None if progress else silent_tqdm}
        if revision is not None:
            kwargs["revision"] = revision
        return [Path(hf_hub_download(repo_id, name, **kwargs)) for name in filenames]
    # huggingface_hub reports trouble with many types (LocalEntryNotFoundError offline and
    # not cached, httpx errors, HfHubHTTPError, XetDownloadError, ...); each means the same here.
    except Exception as e:
        raise WeightsError(
            f"could not download {what} ({repo_id}) from the Hugging Face Hub (offline?) — "
            f"cached copies are used when present: {type(e).__name__}: {e}"
        ) from e


def _revision(path: Path) -> str | None:
    """The commit of a file in huggingface_hub's cache: ``…/snapshots/<commit>/<file>``."""
    return path.parent.name if path.parent.parent.name == "snapshots" else None


_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_REPO_ID = re.compile(rf"{_REPO_PART}/{_REPO_PART}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")


def _parse_hf(spec: str) -> tuple[str, str | None]:
    """``"hf:owner/name[@revision]"`` → (repo id, revision or None)."""
    repo_id, at, revision = spec.removeprefix(HF_PREFIX).partition("@")
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or repo_id.endswith((".", "-")):
        raise WeightsError(f"{spec!r}: not a Hugging Face Hub repository id; write {HF_PREFIX}owner/name[@revision]")
    if at and (not _REVISION.fullmatch(revision) or ".." in revision):
        raise WeightsError(f"{spec!r}: {revision!r} is not a revision (a branch, tag or commit hash)")
    return repo_id, revision or None


# --------------------------------------------------------------------------- loading


def load_pretrained(
    name_or_path: str | os.PathLike[str],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    *,
    n_heads: int | None = None,
) -> GPTModel:
    """A :class:`GPTModel` (eval mode) holding pretrained or saved weights, with ``model.weights_source``.

    ``name_or_path``:

    * a name of :data:`PRETRAINED_NAMES` (downloaded from the Hub with a ``progress`` bar;
      the ``book:`` names are the book companion's ``.pth`` files);
    * ``"hf:owner/name"`` or ``"hf:owner/name@revision"``: any Hub repository holding
      ``model.safetensors`` and ``config.json`` in GPT-2 layout (for operators; visitors only
      reach names that pass :func:`is_allowed_name`);
    * a local path: a directory with ``model.safetensors`` and ``config.json``; a
      ``.safetensors`` file (``config.json`` beside it is used when present, else the
      configuration comes from the tensors); a ``.pth`` / ``.pt`` state dict in the book's
      names (read with ``torch.load(weights_only=True)``). A string that is an allowed name
      always means the Hub model (a local folder called ``gpt2`` needs ``"./gpt2"`` or a
      ``Path``); any other string, ``"owner/name"`` included, is a path.

    ``n_heads``: the number of attention heads where the configuration comes from the tensors
    (default: the released GPT-2 of the same width, :data:`GPT2_HEADS`). ``device``: default
    :func:`~gptviz.settings.select_device`. ``dtype``: default float32; tensors are converted
    as they are read.

    Raises :class:`WeightsError` (unknown name, download failure, missing or refused file)
    or its subclass :class:`CheckpointError` (tensors or config that do not fit GPT-2, a
    pickle that asks for more than tensors), :class:`NeedsHeadsError` among them.
    """
    device = torch.device(device) if device is not None else select_device()
    dtype = dtype or torch.float32
    if isinstance(name_or_path, str) and is_allowed_name(name_or_path):
        info = pretrained_info(name_or_path)
        if info.layout == "book":
            (path,) = _download(name_or_path, info.repo_id, (info.filename,), None, progress)
            model = _load_pth(path, str(path), n_heads, device, dtype)
        else:
            config, path = _download(name_or_path, info.repo_id, (CONFIG_FILE, WEIGHTS_FILE), None, progress)
            model = _load_hf(path, config, str(path), n_heads, device, dtype)
        source = WeightsSource(kind=info.layout if info.layout == "book" else "hub", name=name_or_path,
                               repo_id=info.repo_id, revision=_revision(path), filename=info.filename,
                               config=model.cfg)  # fmt: skip
    elif isinstance(name_or_path, str) and name_or_path.startswith(HF_PREFIX) and not Path(name_or_path).exists():
        repo_id, revision = _parse_hf(name_or_path)
        config, path = _download(name_or_path, repo_id, (CONFIG_FILE, WEIGHTS_FILE), revision, progress)
        model = _load_hf(path, config, str(path), n_heads, device, dtype)
        source = WeightsSource(kind="hub", name=name_or_path, repo_id=repo_id, revision=_revision(path) or revision,
                               filename=WEIGHTS_FILE, config=model.cfg)  # fmt: skip
    else:
        path = Path(name_or_path)
        how, weights, config = _local(path)
        if how == "hf":
            model = _load_hf(weights, config, str(weights), n_heads, device, dtype)
        elif how == "alone":
            model = _load_safetensors_alone(weights, str(weights), n_heads, device, dtype, None)
        else:
            model = _load_pth(weights, str(weights), n_heads, device, dtype)
        source = WeightsSource(kind="file", name=path.name or path.resolve().name, filename=weights.name,
                               sha256=_sha256(weights), config=model.cfg)  # fmt: skip
    model.weights_source = source
    return model


def load_upload(
    path: str | os.PathLike[str],
    n_heads: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    max_bytes: int = Settings.max_upload_bytes,
    max_model_bytes: int | None = Settings.max_model_bytes,
) -> GPTModel:
    """A :class:`GPTModel` (eval mode) from one file a visitor uploaded, with ``model.weights_source``.

    In order: ``path`` must be a regular file (no directory, no symbolic link); its size at
    most ``max_bytes`` (:class:`TooLargeError` giving both sizes, before anything is read);
    ``.safetensors`` (Hugging Face GPT-2 names or the book's) or ``.pth`` / ``.pt`` (the book's
    state dict, or a dict with ``"model_state_dict"``, read by PyTorch's restricted unpickler);
    its configuration from its tensors (``n_heads`` as in :func:`load_pretrained`); the model
    that configuration makes at most ``max_model_bytes`` in ``dtype`` (default float32;
    None: no limit). Nothing beside the file is read (no ``config.json``), and error messages
    name the file by its name only, never its folders.
    """
    path = Path(path)
    label = path.name
    device = torch.device(device) if device is not None else select_device()
    dtype = dtype or torch.float32
    try:
        info = path.lstat()  # lstat: a symbolic link is refused, not followed
    except OSError as e:
        raise WeightsError(f"{label}: cannot read the uploaded file ({type(e).__name__})") from e
    if not stat.S_ISREG(info.st_mode):
        raise WeightsError(f"{label}: not a regular file (directories and links are refused)")
    if info.st_size > max_bytes:
        raise TooLargeError(
            f"{label}: {info.st_size:,} bytes ({info.st_size / 1e9:.2f} GB) is over the upload limit of "
            f"{max_bytes:,} bytes ({max_bytes / 1e9:.2f} GB)"
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        model = _load_safetensors_alone(path, label, n_heads, device, dtype, max_model_bytes)
    elif suffix in _PTH_SUFFIXES:
        model = _load_pth(path, label, n_heads, device, dtype, max_model_bytes)
    elif suffix in _PICKLE_SUFFIXES:
        raise WeightsError(f"{label}: {suffix} pickles are refused (they can run code); upload .safetensors or .pth")
    else:
        raise WeightsError(f"{label}: upload a .safetensors, .pth or .pt file")
    model.weights_source = WeightsSource(kind="file", name=label, filename=label, sha256=_sha256(path),
                                         config=model.cfg)  # fmt: skip
    return model
