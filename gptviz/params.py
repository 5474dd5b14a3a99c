"""Parameter arithmetic for any configuration, without building a model.

The source material counts the 124M model's parameters by hand (token embedding
``50257 * 768 = 38,597,376`` ... total 163,009,536). :func:`param_breakdown` does that
walk-through for any :class:`~gptviz.config.GPTConfig`, row by row in model order, with
the formula of every row; :func:`memory_and_compute` turns the count into bytes and
FLOPs; :func:`nearest_preset` names the released GPT-2 closest in size. Everything is
closed-form, so GPT-3-sized configurations cost as little as the 124M one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import pandas as pd

from .config import GPT2_NAMES, PRESETS, GPTConfig
from .formatting import si

__all__ = [
    "GROUPS",
    "GPT2_PRESETS",
    "NearestPreset",
    "count_params",
    "param_breakdown",
    "format_breakdown",
    "memory_and_compute",
    "nearest_preset",
    "kv_values_per_token",
    "kv_bytes_per_token",
]

#: Subtotal groups, in the order the table lists them.
GROUPS = ("embeddings", "attention", "feed-forward", "layer norms", "output head")
#: The released GPT-2 sizes among :data:`~gptviz.config.PRESETS`.
GPT2_PRESETS = GPT2_NAMES

CfgLike = GPTConfig | Mapping[str, Any]


@dataclass(frozen=True)
class _Component:
    """One parameter-holding module; ``count`` instances (one per block, or 1)."""

    group: str
    component: str
    module: str  # state_dict prefix, ``*`` standing for the block index
    shape: str  # state_dict shapes: nn.Linear stores (out, in)
    formula: str
    each: int
    count: int
    note: str = ""

    @property
    def total(self) -> int:
        return self.each * self.count


def _linear(
    group: str, component: str, module: str, d_in: int, d_out: int, bias: bool, count: int, note: str = ""
) -> _Component:
    shape = f"({d_out}, {d_in})" + (f" + ({d_out},)" if bias else "")
    formula = f"{d_in} * {d_out}" + (f" + {d_out}" if bias else "")
    return _Component(group, component, module, shape, formula, d_in * d_out + (d_out if bias else 0), count, note)


def _layer_norm(component: str, module: str, d: int, count: int) -> _Component:
    return _Component("layer norms", component, module, f"({d},) + ({d},)", f"{d} + {d}", 2 * d, count, "scale + shift")


def _components(cfg: GPTConfig) -> list[_Component]:
    """Every parameter-holding module of ``GPTModel(cfg)``, in model order."""
    v, t, d, n = cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_layers
    qkv_note = "" if cfg.qkv_bias else "no bias (qkv_bias=False)"
    head = (
        _Component("output head", "output head", "out_head", f"({v}, {d})", "shared with tok_emb", 0, 1,
                   "tied: shared with tok_emb, 0 new parameters")
        if cfg.tie_weights
        else _linear("output head", "output head", "out_head", d, v, False, 1, "not tied to tok_emb (as the source)")
    )
    return [
        _Component("embeddings", "token embedding", "tok_emb", f"({v}, {d})", f"{v} * {d}", v * d, 1),
        _Component("embeddings", "position embedding", "pos_emb", f"({t}, {d})", f"{t} * {d}", t * d, 1),
        _linear("attention", "W_query", "trf_blocks.*.att.W_query", d, d, cfg.qkv_bias, n, qkv_note),
        _linear("attention", "W_key", "trf_blocks.*.att.W_key", d, d, cfg.qkv_bias, n, qkv_note),
        _linear("attention", "W_value", "trf_blocks.*.att.W_value", d, d, cfg.qkv_bias, n, qkv_note),
        _linear("attention", "out_proj", "trf_blocks.*.att.out_proj", d, d, True, n),
        _linear("feed-forward", "ff first linear", "trf_blocks.*.ff.layers.0", d, 4 * d, True, n),
        _linear("feed-forward", "ff second linear", "trf_blocks.*.ff.layers.2", 4 * d, d, True, n),
        _layer_norm("norm1", "trf_blocks.*.norm1", d, n),
        _layer_norm("norm2", "trf_blocks.*.norm2", d, n),
        _layer_norm("final norm", "final_norm", d, 1),
        head,
    ]


def _check_int64(value: int) -> None:
    """Tables hold int64 numbers; refuse (clearly) a configuration whose figures do not fit."""
    if value > 2**63 - 1:
        raise ValueError(f"configuration too large to tabulate: {value:.3e} exceeds the int64 range (2**63 - 1)")


def count_params(cfg: CfgLike) -> int:
    """Number of parameters of ``GPTModel(cfg)`` (a tied head counted once), computed analytically."""
    return sum(c.total for c in _components(GPTConfig.coerce(cfg)))


def param_breakdown(cfg: CfgLike) -> pd.DataFrame:
    """The source's parameter walk-through for any configuration, one row per component.

    Rows (column ``kind``): ``"component"`` rows in model order (embeddings, the eight
    per-block modules, final norm, output head), one ``"block"`` row (a whole
    TransformerBlock × n_layers) placed after the per-block modules, one ``"subtotal"``
    row per group of :data:`GROUPS`, and the ``"total"``. The component rows add up to
    the total, and so do the subtotal rows; the block row is a summary of eight of them.

    Columns: ``kind, group, component, module`` (state_dict prefix, ``*`` = block index),
    ``shape`` (state_dict shapes), ``formula`` (``768 * 3072 + 3072``), ``params_each``
    (per block or per instance; ``<NA>`` where it has no meaning), ``count`` (instances),
    ``total``, ``percent`` (of the model), ``note``. Numbers stay numeric; see
    :func:`format_breakdown` for display.
    """
    cfg = GPTConfig.coerce(cfg)
    comps = _components(cfg)
    n = cfg.n_layers
    grand = sum(c.total for c in comps)
    _check_int64(grand)
    sub = {g: sum(c.total for c in comps if c.group == g) for g in GROUPS}
    per_block = {g: sum(c.each for c in comps if c.group == g and c.module.startswith("trf_blocks."))
                 for g in ("attention", "feed-forward", "layer norms")}
    block_each = sum(per_block.values())

    def row(kind: str, group: str, component: str, module: str, shape: str, formula: str,
            each: int | None, count: int | None, total: int, note: str = "") -> dict[str, Any]:
        return dict(kind=kind, group=group, component=component, module=module, shape=shape, formula=formula,
                    params_each=each, count=count, total=total, note=note)

    rows = [row("component", c.group, c.component, c.module, c.shape, c.formula, c.each, c.count, c.total, c.note)
            for c in comps]
    block = row("block", "transformer blocks", "transformer block", "trf_blocks.*", "",
                " + ".join(f"{per_block[g]:,}" for g in per_block), block_each, n, block_each * n,
                "attention + feed-forward + norm1 and norm2, per block")
    rows.insert(len(comps) - 2, block)  # after the per-block modules, before final_norm
    head = comps[-1].total
    rows += [
        row("subtotal", "embeddings", "embeddings subtotal", "tok_emb, pos_emb", "",
            f"{comps[0].total:,} + {comps[1].total:,}", None, None, sub["embeddings"]),
        row("subtotal", "attention", "attention subtotal", "trf_blocks.*.att", "",
            f"{n} * {per_block['attention']:,}", per_block["attention"], n, sub["attention"]),
        row("subtotal", "feed-forward", "feed-forward subtotal", "trf_blocks.*.ff", "",
            f"{n} * {per_block['feed-forward']:,}", per_block["feed-forward"], n, sub["feed-forward"]),
        row("subtotal", "layer norms", "layer norms subtotal", "trf_blocks.*.norm1/norm2, final_norm", "",
            f"{n} * {per_block['layer norms']:,} + {comps[-2].total:,}", None, None, sub["layer norms"]),
        row("subtotal", "output head", "output head subtotal", "out_head", "",
            "0 (shared with tok_emb)" if cfg.tie_weights else f"{head:,}", None, None, sub["output head"],
            comps[-1].note),
        row("total", "total", "total", "", "", " + ".join(f"{sub[g]:,}" for g in GROUPS), None, None, grand,
            "tied head counted once" if cfg.tie_weights else ""),
    ]
    df = pd.DataFrame(rows)
    df["params_each"] = df["params_each"].astype("Int64")
    df["count"] = df["count"].astype("Int64")
    df["total"] = df["total"].astype("int64")
    df["percent"] = 100.0 * df["total"] / grand
    return df[["kind", "group", "component", "module", "shape", "formula", "params_each", "count", "total",
               "percent", "note"]]


#: Display headers for :func:`format_breakdown`.
_DISPLAY_COLUMNS = {
    "group": "group", "component": "component", "module": "module", "shape": "shape", "formula": "formula",
    "params_each": "params each", "count": "×", "total": "total", "percent": "% of model", "note": "note",
}


def format_breakdown(df: pd.DataFrame) -> pd.DataFrame:
    """A display copy of :func:`param_breakdown`'s table: strings with thousands separators
    (``38,597,376``), percentages with two decimals, blanks for missing values."""
    out = df[list(_DISPLAY_COLUMNS)].copy()
    for col in ("params_each", "count", "total"):
        out[col] = [("" if pd.isna(x) else f"{int(x):,}") for x in df[col]]
    out["percent"] = [f"{x:.2f} %" for x in df["percent"]]
    return out.rename(columns=_DISPLAY_COLUMNS)


# --------------------------------------------------------------------------- memory and compute


def kv_values_per_token(cfg: CfgLike) -> int:
    """Numbers the KV cache keeps per token: keys and values (2) of every layer, each emb_dim
    wide (n_heads × head_dim)."""
    cfg = GPTConfig.coerce(cfg)
    return 2 * cfg.n_layers * cfg.emb_dim


def kv_bytes_per_token(cfg: CfgLike, element_size: int) -> int:
    """Bytes of KV cache per token at ``element_size`` bytes per number (4 in float32)."""
    return kv_values_per_token(cfg) * element_size


def memory_and_compute(cfg: CfgLike) -> pd.DataFrame:
    """Memory and compute for one sequence at batch size 1; index = a stable key.

    Columns: ``quantity`` (label), ``value`` (an int, in ``unit``), ``unit`` (``bytes`` or
    ``FLOP``), ``readable`` (``497.8 MB``; decimal prefixes), ``formula`` (symbolic, then
    with this configuration's numbers). N is :func:`count_params` (a tied head counted once).

    * weights: 4 / 2 / 1 bytes per parameter (fp32 / bf16 / int8);
    * training with AdamW in fp32: 16 bytes per parameter (weights, gradients and the two
      moments at 4 bytes each); activations are excluded, they depend on batch and length;
    * KV cache: 2 (keys and values) · n_layers · emb_dim values per token, at fp32 and bf16,
      and for a full context of ``context_length`` tokens;
    * forward FLOPs per token, Kaplan et al. (2020, table 1): ``2·N_ne + 2·n_layers·n_ctx·emb_dim``,
      where N_ne is the *non-embedding* parameter count (every parameter but tok_emb,
      pos_emb and out_head: the exact count, biases and LayerNorms included) and n_ctx is
      ``context_length`` (a token at the end of a full context); a second row adds the
      output head's matrix product, ``2·emb_dim·vocab_size``, which Kaplan leaves out.
    """
    cfg = GPTConfig.coerce(cfg)
    comps = _components(cfg)
    n_params = sum(c.total for c in comps)
    v, t, d, n = cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_layers
    non_emb = n_params - sum(c.total for c in comps if c.module in ("tok_emb", "pos_emb", "out_head"))
    kv_token = kv_values_per_token(cfg)
    attn = 2 * n * t * d
    flops = 2 * non_emb + attn
    rows = {
        "weights_fp32": ("weights, fp32", 4 * n_params, "bytes", f"4 B · N = 4 · {n_params:,}"),
        "weights_bf16": ("weights, bf16", 2 * n_params, "bytes", f"2 B · N = 2 · {n_params:,}"),
        "weights_int8": ("weights, int8", n_params, "bytes", f"1 B · N = {n_params:,}"),
        "train_adamw_fp32": ("training, AdamW fp32 (no activations)", 16 * n_params, "bytes",
                             f"(4 weights + 4 gradients + 8 moments) B · N = 16 · {n_params:,}"),
        "kv_token_fp32": ("KV cache per token, fp32", 4 * kv_token, "bytes",
                          f"2 · n_layers · emb_dim · 4 B = 2 · {n} · {d} · 4"),
        "kv_token_bf16": ("KV cache per token, bf16", 2 * kv_token, "bytes",
                          f"2 · n_layers · emb_dim · 2 B = 2 · {n} · {d} · 2"),
        "kv_context_fp32": (f"KV cache at full context ({t:,} tokens), fp32", 4 * kv_token * t, "bytes",
                            f"2 · n_layers · emb_dim · context_length · 4 B = 2 · {n} · {d} · {t} · 4"),
        "kv_context_bf16": (f"KV cache at full context ({t:,} tokens), bf16", 2 * kv_token * t, "bytes",
                            f"2 · n_layers · emb_dim · context_length · 2 B = 2 · {n} · {d} · {t} · 2"),
        "flops_token": ("forward FLOPs per token (Kaplan)", flops, "FLOP",
                        f"2 · N_non-embedding + 2 · n_layers · context_length · emb_dim "
                        f"= 2 · {non_emb:,} + 2 · {n} · {t} · {d}"),
        "flops_token_with_head": ("forward FLOPs per token, with the output head", flops + 2 * d * v, "FLOP",
                                  f"Kaplan + 2 · emb_dim · vocab_size = {flops:,} + 2 · {d} · {v}"),
    }
    _check_int64(max(r[1] for r in rows.values()))
    df = pd.DataFrame.from_dict(rows, orient="index", columns=["quantity", "value", "unit", "formula"])
    df["value"] = df["value"].astype("int64")
    df["readable"] = [si(x, "B" if u == "bytes" else "FLOP") for x, u in zip(df["value"], df["unit"])]
    return df[["quantity", "value", "unit", "readable", "formula"]]


# --------------------------------------------------------------------------- presets


class NearestPreset(NamedTuple):
    """The released GPT-2 size closest to a configuration; ``ratio`` = its count / the preset's."""

    name: str
    params: int
    ratio: float


def nearest_preset(cfg: CfgLike) -> NearestPreset:
    """The GPT-2 preset nearest by parameter count, on a log scale (so 2× and ½× are equally far)."""
    n = count_params(cfg)
    sizes = {name: count_params(PRESETS[name]) for name in GPT2_PRESETS}
    name = min(sizes, key=lambda k: abs(math.log(n / sizes[k])))
    return NearestPreset(name, sizes[name], n / sizes[name])
