"""How one step of a generation session is drawn in the Generate view: the token chips, the
step in words, the KV-cache readout, the candidates, the attention heatmaps, the logit lens and
the step's data — for any step ``k`` of the session (0: the prompt, before any step)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch

from ..analysis.heads import known_head_roles, session_value_weighted, strongest_role
from ..formatting import nbytes, percent
from ..generation.session import GenerationSession
from ..model import GPTModel
from ..params import kv_bytes_per_token
from ..plots.generation import attention_figure, attention_grid_figure, logit_lens_figure, sampling_figure, topk_figure
from ..plots.heads import ROLE_LABELS
from ..plots.style import empty_figure
from ..tokenizer import get_encoding, label
from .components import csv_file
from .html import chips_html, md_code
from .serving import AppContext, Visitor

HEATMAP_HEIGHT, GRID_HEIGHT, TOPK_HEIGHT, LENS_HEIGHT = 520, 720, 380, 500
THRESHOLD = 0.4  # a head's role is named in its heatmap title from this score on


def role_note(model: GPTModel, layer: int, head: int, threshold: float = THRESHOLD) -> str | None:
    """The strongest role of head ``(layer, head)`` and its score, e.g. ``"induction 0.62"``, for a
    heatmap title; None when the model's roles were not measured yet (this never measures them),
    when no score reaches ``threshold``, or when the model has no such head."""
    df = known_head_roles(model)
    if df is None:
        return None
    try:
        found = strongest_role(df, int(layer), int(head), threshold)
    except (KeyError, TypeError, ValueError):
        return None
    return None if found is None else f"{ROLE_LABELS[found[0]]} {found[1]:.2f}"


@dataclass(frozen=True)
class _Attention:
    """One layer's attention over the displayed window, ready to plot."""

    layer: int
    weights: torch.Tensor  # (n_heads, W, W), row = query, column = key
    positions: list[int]  # absolute positions of the W tokens
    labels: list[str]  # their display pieces
    span: str  # "tokens 0–14", for titles


def _lens_height(n_layers: int) -> int:
    """Room for two lines of text per block (taller for the larger GPT-2s)."""
    return max(LENS_HEIGHT, 170 + 28 * n_layers)


class StepPictures:
    """Drawing a step; the Generate view's handlers call these with the visitor's lock held."""

    ctx: AppContext

    def _text_html(self, s: GenerationSession, k: int) -> str:
        """The growing text: prompt chips, then generated chips (step ``k``'s token outlined)."""
        ids, n_prompt, ctx = s.ids, len(s.prompt_ids), s.model.cfg.context_length
        legend = (f'<div class="legend"><span class="chip">prompt</span> <span class="chip gen">generated</span> '
                  f"&nbsp;{n_prompt} prompt + {len(s.steps)} generated tokens")
        if len(ids) > ctx:
            legend += f" · dimmed tokens lie outside the model's context of {ctx}"
        sampled = {r.position for r in s.steps if r.sampled}
        if sampled:
            legend += f" · {len(sampled)} sampled (dashed)"
        if k < len(s.steps):
            legend += f" · viewing step {k} of {len(s.steps)}"
        chips = chips_html(ids, limit=self.ctx.settings.max_chips, generated_from=n_prompt,
                           unseen_before=max(0, len(ids) - ctx), sampled=sampled,
                           highlight=s.steps[k - 1].position if k else None)
        return chips + legend + "</div>"

    @staticmethod
    def _this_step(s: GenerationSession, k: int) -> str:
        """Step ``k`` in words: what it read and chose, the runner-up, and from which block on
        the logit lens already predicts the choice (Markdown)."""
        r = s.steps[k - 1]
        chosen = next((c for c in r.candidates if c.token_id == r.token_id), None)
        text = f"**Step {k}** read {r.context_len} tokens and chose {md_code(label(r.token_id))}"
        if chosen is not None:
            text += f" (p = {percent(chosen.prob)})"
        runner_up = next((c for c in r.candidates if c.token_id != r.token_id), None)
        if runner_up is not None:
            text += f", ahead of {md_code(label(runner_up.token_id))} ({percent(runner_up.prob)})"
        if r.lens:
            first = len(r.lens)
            while first > 0 and r.lens[first - 1].token_id == r.token_id:
                first -= 1
            last = len(r.lens) - 1
            text += (". Logit lens: every block already predicts it" if first == 0 else
                     ". Logit lens: only the last block predicts it" if first >= last else
                     f". Logit lens: blocks {first}–{last} predict it")
        return text + "."

    def _kv_readout(self, s: GenerationSession, k: int) -> str:
        """What the KV cache holds and the work step ``k`` saved."""
        cfg, size = s.model.cfg, s.model.dtype.itemsize
        per_token = kv_bytes_per_token(cfg, size)
        formula = (f"2 (K, V) × {cfg.n_layers} blocks × {cfg.n_heads} heads × {cfg.head_dim} dims × {size} B "
                   f"= {per_token:,} B per token")
        if not k and s.cache_tokens:  # back at the prompt after Reset: the prompt's keys and values stay
            return (f"**KV cache:** {s.cache_tokens:,} prompt tokens cached = {nbytes(s.cache_tokens * per_token)}; "
                    f"the next Step reuses them.  \n{formula}")
        if not k:
            return (f"**KV cache:** empty. The first Step runs the {len(s.ids)} prompt tokens through the model "
                    f"(a prefill) and keeps their keys and values; every later Step computes 1 position.  \n{formula}")
        r = s.steps[k - 1]
        if r.positions_computed < r.context_len:
            plural = "s" if r.positions_computed > 1 else ""
            work = (f"**This step computed {r.positions_computed} position{plural} instead of {r.context_len}**: "
                    f"the other {r.context_len - r.positions_computed} came from the cache.")
        elif r.cropped:
            work = (f"**This step computed all {r.positions_computed} positions**: the text overflows the context, "
                    "cropping shifts every position, so cached keys and values no longer fit (the source recomputes "
                    "every step).")
        else:
            work = (f"**This step computed all {r.positions_computed} positions** (a prefill: there was no cache to "
                    "reuse).")
        return (f"{self._this_step(s, k)}\n\n"
                f"**KV cache:** {r.cache_tokens:,} tokens cached = {nbytes(r.cache_tokens * per_token)} of keys "
                f"and values ({nbytes(r.cache_bytes)} allocated, grown in chunks) · {formula}  \n"
                f"{work} Step time {r.ms:.0f} ms. The Inside tab shows the cache layer by layer.")

    @staticmethod
    def _candidates_figure(candidates: list, title: str, chosen: int | None, n_kept: int, greedy: bool) -> go.Figure:
        enc = get_encoding()
        pieces, ids = [label(c.token_id, enc, 20) for c in candidates], [c.token_id for c in candidates]
        probs = [c.prob for c in candidates]
        if greedy:
            return topk_figure(pieces, probs, ids, chosen=0 if chosen is None else chosen, height=TOPK_HEIGHT,
                                     title=title)
        return sampling_figure(pieces, probs, [c.sample_prob or 0.0 for c in candidates],
                                     [bool(c.kept) for c in candidates], ids, chosen=chosen, n_kept=n_kept,
                                     height=TOPK_HEIGHT, title=title)

    def _topk_figure(self, s: GenerationSession, k: int) -> go.Figure:
        if not k:
            return empty_figure("Press Step to see the next-token candidates", height=TOPK_HEIGHT)
        r, enc = s.steps[k - 1], get_encoding()
        read = label(s.ids[r.position - 1], enc, 20)
        how = f"draws “{label(r.token_id, enc, 20)}” (sampled, T={r.temperature:g})" if r.sampled else \
            f"picks “{label(r.token_id, enc, 20)}”"
        chosen = next((k for k, c in enumerate(r.candidates) if c.token_id == r.token_id), None)
        return self._candidates_figure(r.candidates, f"Step {k}: after “{read}” the model {how}", chosen,
                                       r.n_kept, not r.sampled)

    def _attention(self, s: GenerationSession, layer: int, k: int, value_weighted: bool = False) -> _Attention:
        """The attention ``layer`` showed at step ``k``; ``value_weighted``: each weight times the
        norm of the value it reads through ``out_proj`` (rows renormalised), for the newest step."""
        window = self.ctx.settings.attn_window
        newest = k == len(s.steps)
        if value_weighted and newest:
            weights, positions = session_value_weighted(s, layer, window)
        else:
            weights, positions = s.attention_at(k, layer, window) if k else s.attention(layer, window)
        span = f"tokens {positions[0]}–{positions[-1]}" + (f" (last {len(positions)})" if positions[0] > 0 else "")
        span += f", read by step {k}" if k else ", the prompt"
        if value_weighted:
            span += ", value-weighted" if newest else " (value weighting shows the newest step only)"
        return _Attention(layer, weights.float().cpu(), positions, [label(s.ids[p]) for p in positions], span)

    @staticmethod
    def _heatmap(a: _Attention, head: int, model: GPTModel | None = None) -> go.Figure:
        role = role_note(model, a.layer, head) if model is not None else None
        return attention_figure(a.weights[head], a.labels, a.positions, height=HEATMAP_HEIGHT,
                                      title=f"Block {a.layer}, head {head}" + (f" — {role}" if role else "")
                                      + f" · {a.span}")

    @staticmethod
    def _layer_figures(a: _Attention) -> tuple[go.Figure, go.Figure]:
        """(head average, all-heads grid) of one layer."""
        n_heads = a.weights.shape[0]
        avg = attention_figure(a.weights.mean(0), a.labels, a.positions, height=HEATMAP_HEIGHT,
                                     title=f"Block {a.layer}, average of {n_heads} heads · {a.span}")
        grid = attention_grid_figure(a.weights, a.labels, a.positions, height=GRID_HEIGHT,
                                           title=f"Block {a.layer}: all {n_heads} heads · {a.span}")
        return avg, grid

    def _lens_figure(self, s: GenerationSession, k: int) -> go.Figure:
        if not k:
            return empty_figure("Press Step to see what every block would predict (logit lens)",
                                      height=LENS_HEIGHT)
        enc = get_encoding()
        first = max(0, k - self.ctx.settings.lens_steps)
        steps = s.steps[first:k]
        read = [label(s.ids[r.position - 1], enc, 10) for r in steps]
        return logit_lens_figure(
            [[label(e.token_id, enc, 24) for e in r.lens] for r in steps], [[e.prob for e in r.lens] for r in steps],
            read, height=_lens_height(len(steps[-1].lens)),
            title=f"Logit lens: each block's top-1 next token, steps {first + 1}–{k}",
        )

    @staticmethod
    def step_data(v: Visitor, k: int | None = None) -> dict:
        """Everything step ``k`` (default: the newest) produced, as plain data (the API's view of the session)."""
        s = v.session
        k = len(s.steps) if k is None else k
        data: dict[str, Any] = dict(model=v.spec.label, ids=s.ids, prompt_tokens=len(s.prompt_ids), text=s.text,
                                    steps=len(s.steps), viewing=k)
        if k:
            r = s.steps[k - 1]
            data["last_step"] = dict(
                token_id=r.token_id, piece=r.piece, cropped=r.cropped, context_len=r.context_len,
                positions_computed=r.positions_computed, cache_tokens=r.cache_tokens, cache_bytes=r.cache_bytes,
                ms=round(r.ms, 2), candidates=[[c.token_id, c.piece, round(c.prob, 6)] for c in r.candidates],
                sampled=r.sampled, temperature=r.temperature, top_k=r.sample_top_k, top_p=r.top_p, seed=r.seed,
                lens=[[e.layer, e.token_id, e.piece, round(e.prob, 6)] for e in r.lens],
            )
        return data

    @staticmethod
    def _candidates_csv(s: GenerationSession, k: int, owner: str = "") -> str | None:
        if not k:
            return None
        r = s.steps[k - 1]
        table = pd.DataFrame([dict(rank=n + 1, id=c.token_id, piece=c.piece, probability=c.prob,
                                   drawn_with=c.sample_prob, may_be_drawn=c.kept, chosen=c.token_id == r.token_id)
                              for n, c in enumerate(r.candidates)])
        return csv_file(table, f"candidates-step-{k}", owner)
