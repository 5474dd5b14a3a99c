"""Why this token? Three views of one next-token prediction (pure functions, no gradio).

* :func:`logit_attribution`: the logit difference ``logit[target] − logit[baseline]`` at the
  last position, split exactly into what each part of the network wrote into the residual
  stream (embeddings, every attention head, every attention bias, every feed-forward, the
  final LayerNorm's shift);
* :func:`lens_table`: the logit lens after every sub-block (attention, feed-forward) with
  the rank and probability of the token the model finally picks; :func:`decided_at` reads
  off the block from which that token stays on top;
* :func:`saliency`: gradient × input on the input embeddings, per position.

All three take the model's optional ``head_mask`` ``(n_layers, n_heads)`` (0 switches a head
off), so they agree with ablation. The model is shared: nothing here changes its parameters,
``.grad``, ``requires_grad``, train/eval mode or hooks. Ids longer than the context are
cropped to the last ``context_length`` tokens (as generation does).

The decomposition behind :func:`logit_attribution`. The final residual stream at the last
position is a sum of pieces, ``x = e + Σ_blocks (Σ_heads a_h + b_attn + f)``, where ``e`` is
the token plus position embedding, ``a_h = context[h] @ out_proj.weight[:, h·hd:(h+1)·hd]ᵀ``
is head ``h``'s share of ``out_proj``, ``b_attn`` is ``out_proj``'s bias and ``f`` the
feed-forward output. The final LayerNorm is ``scale·(x − mean x)/σ + shift`` with
``σ = sqrt(var x + eps)``; with ``σ`` taken from this forward pass it is linear in ``x``
(centring is linear), so with ``d = W_U[target] − W_U[baseline]`` each piece ``c`` contributes
``(scale·(c − mean c)/σ)·d`` and the shift contributes ``shift·d``; the contributions add up
to the logit difference.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch

from ..ids import as_batch
from ..model import GPTModel
from ..trace import CONTEXT, FF_OUT, RESID_MID, RESIDUAL, Trace

__all__ = ["logit_attribution", "lens_table", "decided_at", "decided_row", "saliency", "ATTRIBUTION_KINDS"]

TokenIds = Sequence[int] | torch.Tensor

#: The ``kind`` column of :func:`logit_attribution`, in the order the rows come.
ATTRIBUTION_KINDS = ("embed", "head", "attn_bias", "mlp", "norm")


# --------------------------------------------------------------------------- shared helpers


def _token(model: GPTModel, token: int, name: str) -> int:
    if isinstance(token, torch.Tensor):
        token = token.item()
    if isinstance(token, bool) or int(token) != token:
        raise ValueError(f"{name} must be a token id (an integer), got {token!r}")
    token = int(token)
    if not 0 <= token < model.cfg.vocab_size:
        raise ValueError(f"{name} must lie in [0, {model.cfg.vocab_size}), got {token}")
    return token


def _mask(model: GPTModel, head_mask: torch.Tensor | None) -> torch.Tensor | None:
    if head_mask is None:
        return None
    cfg = model.cfg
    mask = torch.as_tensor(head_mask)
    if tuple(mask.shape) != (cfg.n_layers, cfg.n_heads):
        raise ValueError(
            f"head_mask must have shape (n_layers, n_heads) = ({cfg.n_layers}, {cfg.n_heads}), got {tuple(mask.shape)}"
        )
    return mask.to(model.device)


def _embeddings(model: GPTModel, batch: torch.Tensor) -> torch.Tensor:
    """``tok_emb(ids) + pos_emb(arange(T))``, ``(1, T, emb)``: the forward's own first line."""
    positions = torch.arange(batch.shape[1], device=batch.device)  # (T,)
    return model.tok_emb(batch) + model.pos_emb(positions)  # (1, T, emb)


# --------------------------------------------------------------------------- attribution


def logit_attribution(
    model: GPTModel,
    ids: TokenIds,
    target: int,
    baseline: int | None = None,
    head_mask: torch.Tensor | None = None,
) -> pd.DataFrame:
    """Direct contributions to ``logit[target] − logit[baseline]`` at the last position.

    ``baseline`` defaults to the runner-up: the highest-logit token other than ``target``.
    One row per piece the residual stream is a sum of, in the order the forward pass adds them:
    ``embeddings``; per block ``block i · head h`` for every head, ``block i · attention bias``
    (``out_proj``'s bias), ``block i · feed-forward``; last ``final norm shift``. Columns:
    ``component`` (those names), ``layer`` (block index, None for the embeddings and the
    norm), ``head`` (None where the row is not a head), ``kind`` (one of
    :data:`ATTRIBUTION_KINDS`) and ``contribution`` (float, logit units). The contributions
    are direct effects through the final LayerNorm, whose standard deviation is the one of
    this forward pass (see the module docstring); they sum to the logit difference (within
    ~1e-4 in float32). A head switched off by ``head_mask`` contributes exactly 0.

    ``df.attrs``: ``target``, ``baseline`` (ids), ``logit_diff`` (the real difference of the
    model's forward, in the model's dtype), ``n_tokens`` (after cropping). One forward pass
    records only the last position (``Trace(..., last_rows=1)``); the decomposition is then
    computed in float32 whatever the model's dtype (with a bf16/fp16 model the sum matches the
    model's own low-precision logit difference only to that precision).
    """
    cfg = model.cfg
    batch = as_batch(model, ids)
    target = _token(model, target, "target")
    mask = _mask(model, head_mask)
    trace = Trace((CONTEXT, FF_OUT, RESIDUAL), last_rows=1)
    with torch.inference_mode():
        logits = model(batch, trace=trace, head_mask=mask, last_only=True)[0, -1]  # (vocab,)
        if baseline is None:
            if cfg.vocab_size < 2:
                raise ValueError("a vocabulary of one token has no runner-up to compare with")
            others = logits.clone()
            others[target] = -torch.inf
            baseline = int(others.argmax())
        baseline = _token(model, baseline, "baseline")
        if baseline == target:
            raise ValueError(f"baseline must differ from target (both {target})")
        logit_diff = float(logits[target].float() - logits[baseline].float())

        f32 = torch.float32
        W_U = model.out_head.weight  # (vocab, emb); tok_emb's weight when tied
        d = W_U[target].to(f32) - W_U[baseline].to(f32)  # (emb,)
        norm = model.final_norm
        x = trace.get(RESIDUAL)[-1][0, -1].to(f32)  # (emb,) the final residual stream
        sigma = torch.sqrt(x.var(unbiased=False) + norm.eps)  # the forward's standard deviation
        u = norm.scale.to(f32) * d / sigma  # (emb,) what one unit of centred residual is worth

        T = batch.shape[1]
        emb = (model.tok_emb(batch[:, -1]) + model.pos_emb(torch.tensor([T - 1], device=batch.device)))[0]  # (emb,)
        pieces = [emb.to(f32)]
        rows: list[tuple[str, int | None, int | None, str]] = [("embeddings", None, None, "embed")]
        H, hd = cfg.n_heads, cfg.head_dim
        for i, (block, ctx, ff) in enumerate(zip(model.trf_blocks, trace.get(CONTEXT), trace.get(FF_OUT))):
            proj = block.att.out_proj
            W_O = proj.weight.to(f32).reshape(cfg.emb_dim, H, hd)  # (emb, d_out) -> (emb, n_heads, head_dim)
            heads = torch.einsum("hk,ehk->he", ctx[0, -1].to(f32), W_O)  # (n_heads, head_dim) -> (n_heads, emb)
            pieces += [heads, proj.bias.to(f32)[None], ff[0, -1].to(f32)[None]]
            rows += [(f"block {i} · head {h}", i, h, "head") for h in range(H)]
            rows += [(f"block {i} · attention bias", i, None, "attn_bias"), (f"block {i} · feed-forward", i, None, "mlp")]
        C = torch.cat([p.reshape(-1, cfg.emb_dim) for p in pieces])  # (n_pieces, emb)
        contrib = (C - C.mean(dim=-1, keepdim=True)) @ u  # (n_pieces,) centring is linear
        shift = norm.shift.to(f32) @ d
        values = contrib.cpu().tolist() + [float(shift)]
    rows.append(("final norm shift", None, None, "norm"))
    df = pd.DataFrame(
        {
            "component": [r[0] for r in rows],
            "layer": pd.Series([r[1] for r in rows], dtype=object),
            "head": pd.Series([r[2] for r in rows], dtype=object),
            "kind": [r[3] for r in rows],
            "contribution": values,
        }
    )
    df.attrs.update(target=target, baseline=baseline, logit_diff=logit_diff, n_tokens=T)
    return df


# --------------------------------------------------------------------------- logit lens


def lens_table(model: GPTModel, ids: TokenIds, head_mask: torch.Tensor | None = None) -> pd.DataFrame:
    """The logit lens at the last position after every sub-block, against the model's choice.

    ``2 × n_layers`` rows in forward order: after block ``i``'s attention (the residual stream
    ``resid_mid``) and after its feed-forward (the block's output). Each row applies
    ``final_norm`` (recomputed on that row's residual) and ``out_head``. Columns: ``layer``,
    ``after`` (``"attention"`` / ``"feed-forward"``), ``top1_id``, ``top1_prob``, ``final_id``
    (the model's own pick: argmax of its real next-token logits), ``final_rank`` (0 = top
    there), ``final_prob``, ``entropy`` (nats) and ``kl_from_final`` = KL(final ‖ row) =
    Σ p_final · (log p_final − log p_row), in nats (0 on the last row). The last row is the
    model's own prediction, up to float rounding (~1e-6: one batched ``out_head`` product
    serves every row, a different kernel from the forward's one-row product).
    One forward pass (last position only recorded).
    """
    cfg = model.cfg
    batch = as_batch(model, ids)
    mask = _mask(model, head_mask)
    trace = Trace((RESID_MID, RESIDUAL), last_rows=1)
    with torch.inference_mode():
        logits = model(batch, trace=trace, head_mask=mask, last_only=True)[0, -1].float()  # (vocab,)
        final_id = int(logits.argmax())
        rows = [r for pair in zip(trace.get(RESID_MID), trace.get(RESIDUAL)) for r in pair]  # 2L × (1, 1, emb)
        resid = torch.cat([r.reshape(1, cfg.emb_dim) for r in rows])  # (2L, emb)
        lens = model.out_head(model.final_norm(resid)).float()  # (2L, vocab) one batched product
        logp = torch.log_softmax(lens, dim=-1)  # (2L, vocab)
        p = logp.exp()
        top = logp.max(dim=-1)
        final_logp = torch.log_softmax(logits, dim=-1)  # (vocab,)
        final_p = final_logp.exp()
        rank = (lens > lens[:, final_id : final_id + 1]).sum(dim=-1)  # (2L,) tokens strictly ahead
        entropy = -(p * logp).sum(dim=-1)  # (2L,)
        kl = (final_p * (final_logp - logp)).sum(dim=-1).clamp_min(0)  # (2L,) KL(final || row)
        out = {
            "layer": [i for i in range(cfg.n_layers) for _ in range(2)],
            "after": ["attention", "feed-forward"] * cfg.n_layers,
            "top1_id": top.indices.cpu().tolist(),
            "top1_prob": top.values.exp().cpu().tolist(),
            "final_id": [final_id] * (2 * cfg.n_layers),
            "final_rank": rank.cpu().tolist(),
            "final_prob": p[:, final_id].cpu().tolist(),
            "entropy": entropy.cpu().tolist(),
            "kl_from_final": kl.cpu().tolist(),
        }
    table = pd.DataFrame(out)
    table.attrs.update(final_id=final_id, final_prob=float(final_p[final_id]), n_tokens=batch.shape[1])
    return table


def decided_row(table: pd.DataFrame) -> int | None:
    """Index (0-based position) of the first row of :func:`lens_table` from which the final
    token is top-1 in every row through the last; None if it is not top-1 on the last row."""
    top = (table["top1_id"].to_numpy() == table["final_id"].to_numpy()).tolist()
    if not top or not top[-1]:
        return None
    k = len(top) - 1
    while k > 0 and top[k - 1]:
        k -= 1
    return k


def decided_at(table: pd.DataFrame) -> int | None:
    """The first block from which the final token stays top-1 through the end (the ``layer``
    of :func:`decided_row`'s row; it may have become top-1 after that block's attention or
    only after its feed-forward), or None if it never does."""
    k = decided_row(table)
    return None if k is None else int(table["layer"].iloc[k])


# --------------------------------------------------------------------------- saliency


def saliency(model: GPTModel, ids: TokenIds, target: int, head_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient × input saliency of ``log p(target)`` at the last position: ``(T,)`` float32 on the CPU.

    For each input position ``t`` (after cropping), ``‖ e_t ⊙ ∂ log p(target) / ∂ e_t ‖₂`` where
    ``e_t = tok_emb(id_t) + pos_emb(t)`` is the input embedding. Costs one forward and one
    backward pass (autograd through the book's blocks; the backward keeps the forward's
    activations, roughly a few times the memory of a plain forward).

    Safe on a shared model: the embedding sum is computed here as a fresh leaf tensor that
    requires grad, and only its gradient is asked for (``torch.autograd.grad``), so no
    parameter's ``.grad`` is touched, no ``requires_grad`` or train/eval mode changes, no hook
    is added; gradient mode is thread-local, so other threads' ``no_grad`` forward passes on
    the same model run as usual meanwhile.
    """
    batch = as_batch(model, ids)
    target = _token(model, target, "target")
    mask = _mask(model, head_mask)
    with torch.inference_mode(False), torch.enable_grad():
        with torch.no_grad():
            emb = _embeddings(model, batch)  # (1, T, emb)
        emb = emb.detach().clone().requires_grad_(True)  # our own leaf: the graph starts here
        x = model.drop_emb(emb)  # identity in eval mode
        for i, block in enumerate(model.trf_blocks):
            x = block(x, None, None, None if mask is None else mask[i])  # (1, T, emb)
        logits = model.out_head(model.final_norm(x[:, -1, :]))  # (1, vocab)
        logp = torch.log_softmax(logits.float(), dim=-1)[0, target]
        (grad,) = torch.autograd.grad(logp, inputs=[emb])  # (1, T, emb)
    scores = (grad.float() * emb.detach().float()).norm(dim=-1)[0]  # (T,)
    return scores.cpu()
