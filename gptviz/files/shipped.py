"""The model gptviz ships: trained here with :mod:`gptviz.train`, in ``assets/models/``, loaded offline.

``python -m gptviz.tools.ship`` makes it (The Verdict and Shakespeare's plays; its docstring has
the recipe). The folder holds ``model.safetensors`` and ``config.json`` in Hugging Face GPT-2
layout, so :func:`~gptviz.files.weights.load_pretrained` reads it like any local checkpoint, and
``training.json``: how it was made and what it measured.

To stay under 10 MB (a Hugging Face Space takes such a file without Git LFS) the token embedding
(also the output head: the weights are tied) is stored as 8-bit integers with one float32 scale
per row (:func:`quantize_rows`: per-row absmax), every other tensor in float32. Loading
dequantises it to float32 (:func:`dequantize_rows`): **the shipped model is those dequantised
weights**, and everything ``training.json`` reports after training was measured on them.

:func:`hf_tensors` writes a :class:`~gptviz.model.GPTModel` in GPT-2's names (the inverse of the
loader's name table in :mod:`gptviz.files.checkpoints`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..config import GPTConfig
from ..model import GPTModel
from .checkpoints import SCALE_SUFFIX, dequantize_rows

__all__ = ["SHIPPED_NAME", "SHIPPED_DIR", "SHIPPED_SHA256", "MAX_SHIPPED_BYTES", "quantize_rows", "dequantize_rows",
           "hf_tensors", "hf_config", "save_shipped", "shipped_config", "shipped_figures", "load_shipped",
           "file_sha256"]

SHIPPED_NAME = "gptviz-verdict-shakespeare"
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "assets" / "models" / SHIPPED_NAME
#: sha256 of ``SHIPPED_DIR / "model.safetensors"`` as ``python -m gptviz.tools.ship`` wrote it.
SHIPPED_SHA256 = "9f7469b2b9cfca6b40cadba46a80e116c6e1762817f753a72bc3b063de205c92"
MAX_SHIPPED_BYTES = 10 * 10**6  # a Hugging Face Space takes files up to 10 MB without Git LFS
WEIGHTS_FILE, CONFIG_FILE, FIGURES_FILE = "model.safetensors", "config.json", "training.json"


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax 8-bit quantisation of a matrix ``(rows, cols)``: ``(int8 (rows, cols), float32 (rows,))``
    with ``q = round(w / scale)``, ``scale = max|row| / 127`` (a row of zeros gets scale 1)."""
    w = weight.detach().to(torch.float32)
    absmax = w.abs().amax(dim=1)  # (rows,)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    q = torch.round(w / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def hf_tensors(model: GPTModel) -> dict[str, torch.Tensor]:
    """``model``'s weights in Hugging Face GPT-2 names and layout (``Conv1D``: ``(in, out)``; query, key and
    value fused into ``c_attn``); the head is left out (it is ``wte``, tied). Needs ``qkv_bias`` and a tied head."""
    cfg = model.cfg
    if not (cfg.qkv_bias and cfg.tie_weights):
        raise ValueError("GPT-2's layout needs qkv_bias=True and tie_weights=True")
    s = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}

    def conv(name: str) -> torch.Tensor:  # nn.Linear (out, in) -> Conv1D (in, out)
        return s[name].t().contiguous()

    out = {"wte.weight": s["tok_emb.weight"], "wpe.weight": s["pos_emb.weight"],
           "ln_f.weight": s["final_norm.scale"], "ln_f.bias": s["final_norm.shift"]}  # fmt: skip
    for i in range(cfg.n_layers):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        qkv = ("W_query", "W_key", "W_value")
        out |= {
            h + "ln_1.weight": s[b + "norm1.scale"], h + "ln_1.bias": s[b + "norm1.shift"],
            h + "attn.c_attn.weight": torch.cat([s[f"{b}att.{n}.weight"] for n in qkv]).t().contiguous(),
            h + "attn.c_attn.bias": torch.cat([s[f"{b}att.{n}.bias"] for n in qkv]),
            h + "attn.c_proj.weight": conv(b + "att.out_proj.weight"), h + "attn.c_proj.bias": s[b + "att.out_proj.bias"],
            h + "ln_2.weight": s[b + "norm2.scale"], h + "ln_2.bias": s[b + "norm2.shift"],
            h + "mlp.c_fc.weight": conv(b + "ff.layers.0.weight"), h + "mlp.c_fc.bias": s[b + "ff.layers.0.bias"],
            h + "mlp.c_proj.weight": conv(b + "ff.layers.2.weight"), h + "mlp.c_proj.bias": s[b + "ff.layers.2.bias"],
        }  # fmt: skip
    return {k: v.contiguous().clone() for k, v in out.items()}


def hf_config(cfg: GPTConfig) -> dict[str, Any]:
    """The ``config.json`` of ``cfg`` in Hugging Face GPT-2 terms (what :func:`~gptviz.files.weights.config_from_hf` reads)."""
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
            "n_positions": cfg.context_length, "n_embd": cfg.emb_dim, "n_head": cfg.n_heads, "n_layer": cfg.n_layers,
            "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": cfg.drop_rate, "embd_pdrop": cfg.drop_rate, "attn_pdrop": cfg.drop_rate,
            "tie_word_embeddings": True, "scale_attn_weights": True}  # fmt: skip


def save_shipped(model: GPTModel, folder: str | Path, quantize: tuple[str, ...] = ("wte.weight",)) -> Path:
    """Write ``model`` as ``folder/model.safetensors`` + ``config.json`` (GPT-2 layout), the tensors in
    ``quantize`` as int8 with a ``<name>_scale`` beside each; returns the weights file. The tensors depend
    only on the weights (sorted keys, fixed metadata); safetensors writes the two metadata entries in
    its hash map's order, which varies between saves, so compare files by their tensors, not their bytes."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(model)
    for name in quantize:
        tensors[name], tensors[name + SCALE_SUFFIX] = quantize_rows(tensors[name])
    note = ", ".join(quantize) + ": int8, per-row absmax; dequantised to float32 on load" if quantize else "none"
    path = folder / WEIGHTS_FILE
    save_file(dict(sorted(tensors.items())), str(path), metadata={"format": "pt", "gptviz_quantization": note})
    (folder / CONFIG_FILE).write_text(json.dumps(hf_config(model.cfg), indent=2) + "\n", encoding="utf-8")
    return path


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shipped_config(folder: Path | None = None) -> GPTConfig | None:
    """The shipped model's configuration from its ``config.json`` (no tensor read); None if it is missing."""
    from .checkpoint_config import config_from_hf

    path = (folder or SHIPPED_DIR) / CONFIG_FILE
    return config_from_hf(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


def shipped_figures(folder: Path | None = None) -> dict[str, Any]:
    """``training.json``: the recipe, the training run's figures and what the atlas found ({} if absent)."""
    path = (folder or SHIPPED_DIR) / FIGURES_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load_shipped(device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 folder: Path | None = None, sha256: str | None = None) -> GPTModel:
    """The shipped model (eval mode, float32 unless ``dtype``), read from ``folder`` (default
    :data:`SHIPPED_DIR`) with no network; :class:`~gptviz.files.weights.WeightsError` if its file is
    missing or is not the one shipped (``sha256``: default :data:`SHIPPED_SHA256` for the shipped
    folder, none checked for another)."""
    from .checkpoint_config import WeightsError
    from .weights import load_pretrained

    folder = folder or SHIPPED_DIR
    expected = sha256 if sha256 is not None else (SHIPPED_SHA256 if folder == SHIPPED_DIR else "")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise WeightsError(f"the shipped model {SHIPPED_NAME} is missing ({weights.name} not in assets/models/"
                           f"{folder.name}); rebuild it with python -m gptviz.tools.ship")
    model = load_pretrained(folder, device=device, dtype=dtype)
    found = model.weights_source.sha256
    if expected and found != expected:
        raise WeightsError(f"assets/models/{folder.name}/{weights.name} is not the shipped file (sha256 {found[:12]}…, "
                           f"expected {expected[:12]}…)")
    return model
