"""Reading and checking one checkpoint file: Hugging Face GPT-2 safetensors (with or without
``config.json``), the book's state dicts (``.safetensors`` or ``.pth``), and :func:`load_upload`,
the visitors' door for one uploaded file.

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
above the diagonal) and dropped. ``.pth`` files are read with ``torch.load(weights_only=True)``,
PyTorch's restricted unpickler: a file whose pickle asks for anything beyond tensors is refused
and nothing in it runs. An int8 matrix with ``<name>_scale`` (one float per row) beside it is
dequantised to float32 as it is read (:func:`dequantize_rows`; the shipped model's embedding).

:mod:`gptviz.files.weights` re-exports :func:`load_upload`; where files come from (names, the Hub,
local paths) is there.
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
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..config import GPTConfig
from ..model import GPTModel, MultiHeadAttention
from ..settings import Settings, select_device
from .checkpoint_config import CheckpointError, TooLargeError, WeightsError, WeightsSource, _check_memory, _Labelled, config_from_hf, config_from_hf_shapes, config_from_state_dict

__all__ = ["load_upload", "dequantize_rows", "SCALE_SUFFIX"]

_PTH_SUFFIXES = (".pth", ".pt")  # read with torch.load(weights_only=True)
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pkl")  # refused unread
SCALE_SUFFIX = "_scale"  # "<name>_scale" beside an int8 "<name>": its per-row scales (dequantize_rows)


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


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An int8 matrix ``(rows, cols)`` and its per-row ``scale`` ``(rows,)`` back to float32: ``q * scale``."""
    return q.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)


def _scales(f: Any, shapes: dict[str, tuple[int, ...]], label: str) -> dict[str, str]:
    """int8 tensors that carry a per-row scale ``<name>_scale`` beside them (the shipped model's embedding,
    :mod:`gptviz.files.shipped`): tensor name → its scale's name; the scales leave ``shapes``."""
    found = {}
    for key in [k for k in shapes if k + SCALE_SUFFIX in shapes]:
        scale = key + SCALE_SUFFIX
        if f.get_slice(key).get_dtype() != "I8" or len(shapes[key]) != 2 or shapes[scale] != shapes[key][:1]:
            raise CheckpointError(f"{label}: {scale} must be one scale per row of an int8 matrix {key} "
                                  f"(got {key} {f.get_slice(key).get_dtype()} {shapes[key]}, {scale} {shapes[scale]})")
        found[key] = scale
    for scale in found.values():
        del shapes[scale]
    return found


def _from_hf_file(
    f: Any, cfg: GPTConfig, label: str, device: torch.device, dtype: torch.dtype
) -> GPTModel:
    """A GPTModel from an open safetensors file in Hugging Face GPT-2 layout (8-bit rows dequantised)."""
    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    with _Labelled(label):
        scales = _scales(f, shapes, label)
        names = _check_layout(shapes, cfg)

    def get(name: str) -> torch.Tensor:
        key = names[name]
        if key in scales:  # dequantised to float32 first, then the dtype asked for
            return dequantize_rows(f.get_tensor(key), f.get_tensor(scales[key])).to(device=device, dtype=dtype)
        return f.get_tensor(key).to(device=device, dtype=dtype)

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


# --------------------------------------------------------------------------- uploads


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
