"""The released GPT-2 weights, loaded into the source's :class:`~gptviz.model.GPTModel`.

``load_pretrained("gpt2")`` downloads ``model.safetensors`` and ``config.json`` of
``openai-community/gpt2`` (or ``-medium``, ``-large``, ``-xl``) through huggingface_hub
into its standard cache (``HF_HOME``; a cached copy is used offline), and
``load_pretrained(Path("ckpt/"))`` reads a local checkpoint in Hugging Face GPT-2 layout.

Hugging Face names → the source's names (``h.{i}`` is block ``i``):

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
``nn.Linear``'s ``(out, in)``. Only safetensors files are read — pickled ``.bin`` / ``.pt``
checkpoints are refused, never unpickled.

Security: only the operator passes paths (Python, an environment variable). Anything a
visitor chose must pass :func:`is_allowed_name` first; a string that is an allowed name
always means the Hub model, and anything else is a path, never a Hub id.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.utils import silent_tqdm
from safetensors import SafetensorError, safe_open

from .config import PRESETS, GPTConfig
from .model import GPTModel, MultiHeadAttention
from .settings import select_device
from .params import count_params

__all__ = [
    "PRETRAINED_NAMES",
    "WeightsError",
    "CheckpointError",
    "is_allowed_name",
    "hub_repo_id",
    "config_from_hf",
    "estimated_bytes",
    "load_pretrained",
]

#: The released GPT-2 models, smallest first (``openai-community/<name>`` on the Hub).
PRETRAINED_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class WeightsError(RuntimeError):
    """Weights could not be loaded: unknown name, download failure, missing or refused file."""


class CheckpointError(WeightsError, ValueError):
    """The checkpoint does not fit GPT-2: missing, unexpected or wrongly shaped tensors, or a bad config."""


def is_allowed_name(name: object) -> bool:
    """True for the released model names only: the one check visitor input must pass."""
    return isinstance(name, str) and name in PRETRAINED_NAMES


def _check_name(name: str) -> str:
    if not is_allowed_name(name):
        raise WeightsError(f"unknown model name {name!r}: choose one of {', '.join(PRETRAINED_NAMES)}")
    return name


def hub_repo_id(name: str) -> str:
    """``"gpt2-xl"`` → ``"openai-community/gpt2-xl"``."""
    return f"openai-community/{_check_name(name)}"


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


# --------------------------------------------------------------------------- memory


def estimated_bytes(name_or_cfg: str | GPTConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the loaded model holds: its parameters in ``dtype`` (the tied head counted once,
    :func:`~gptviz.params.count_params`) plus one causal mask per block (context², 1-byte bool).

    ``name_or_cfg`` is a released name or a :class:`GPTConfig`. Loading briefly needs a
    little more: the tensor being read and converted (at most one embedding matrix).
    """
    cfg = PRESETS[_check_name(name_or_cfg)] if isinstance(name_or_cfg, str) else GPTConfig.coerce(name_or_cfg)
    return count_params(cfg) * dtype.itemsize + cfg.n_layers * cfg.context_length**2


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


# --------------------------------------------------------------------------- files


def _local_files(path: Path) -> tuple[Path, Path]:
    """(weights, config.json) of a checkpoint directory or ``.safetensors`` file."""
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise WeightsError(f"{path}: pickled checkpoints are refused (they can run code); use {WEIGHTS_FILE}")
    if path.is_dir():
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            pickled = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
            hint = f" (found only pickled {', '.join(pickled)}, which are refused)" if pickled else ""
            raise WeightsError(f"{path}: no {WEIGHTS_FILE}{hint}")
    elif path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise WeightsError(f"{path}: not a .safetensors file")
        weights = path
    else:
        raise WeightsError(
            f"{str(path)!r} is neither a released model name ({', '.join(PRETRAINED_NAMES)}) nor an existing path"
        )
    config = weights.parent / CONFIG_FILE
    if not config.is_file():
        raise WeightsError(f"{config}: missing (the checkpoint's configuration must lie beside its weights)")
    return weights, config


def _hub_files(name: str, progress: bool) -> tuple[Path, Path]:
    """(weights, config.json) in the huggingface_hub cache, downloaded when not there."""
    repo_id = hub_repo_id(name)
    try:
        config = hf_hub_download(repo_id, CONFIG_FILE, tqdm_class=None if progress else silent_tqdm)
        weights = hf_hub_download(repo_id, WEIGHTS_FILE, tqdm_class=None if progress else silent_tqdm)
    # huggingface_hub reports trouble with many types (LocalEntryNotFoundError offline and
    # not cached, httpx errors, HfHubHTTPError, XetDownloadError, ...); each means the same here.
    except Exception as e:
        raise WeightsError(
            f"could not download {name} ({repo_id}) from the Hugging Face Hub (offline?) — "
            f"cached copies are used when present: {type(e).__name__}: {e}"
        ) from e
    return Path(weights), Path(config)


# --------------------------------------------------------------------------- loading


def load_pretrained(
    name_or_path: str | os.PathLike[str],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> GPTModel:
    """A :class:`GPTModel` (eval mode) holding GPT-2 weights.

    ``name_or_path``: a released name (:data:`PRETRAINED_NAMES`, fetched from the Hub with a
    ``progress`` bar), or the path of a directory holding ``model.safetensors`` and
    ``config.json``, or of a ``.safetensors`` file with ``config.json`` beside it (a local
    folder called ``gpt2`` needs ``"./gpt2"`` or a ``Path``). ``device``: default
    :func:`~gptviz.model.select_device`. ``dtype``: default float32 (the released files'
    dtype); tensors are converted as they are read.

    Raises :class:`WeightsError` (unknown name, download failure, missing or pickled file)
    or its subclass :class:`CheckpointError` (tensors or config that do not fit GPT-2).
    """
    device = torch.device(device) if device is not None else select_device()
    dtype = dtype or torch.float32
    if isinstance(name_or_path, str) and is_allowed_name(name_or_path):
        weights, config = _hub_files(name_or_path, progress)
    else:
        weights, config = _local_files(Path(name_or_path))

    try:
        hf_config = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad UTF-8 or JSON
        raise CheckpointError(f"{config}: not a readable JSON file ({e})") from e
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{config}: expected a JSON object")
    cfg = config_from_hf(hf_config)

    try:
        with safe_open(weights, framework="pt") as f:
            names = _check_layout({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, cfg)

            def get(name: str) -> torch.Tensor:
                return f.get_tensor(names[name]).to(device=device, dtype=dtype)

            state = _seed_state(get, cfg)
            if "lm_head.weight" in names and not torch.equal(get("lm_head.weight"), state["tok_emb.weight"]):
                raise CheckpointError(f"{weights}: lm_head.weight differs from wte.weight; GPT-2's head is tied")
    except SafetensorError as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from e

    with torch.device("meta"):  # no storage: no time spent on a random init that loading replaces
        model = GPTModel(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    model.out_head.weight = model.tok_emb.weight  # assign=True made two Parameters; tie them again
    # The causal masks are non-persistent buffers (in no checkpoint), still on the meta
    # device: take real ones from a small MultiHeadAttention of the same context length.
    mask = MultiHeadAttention(1, 1, cfg.context_length, 0.0, 1).mask.to(device)
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.mask = mask.clone()
    return model.eval()
