"""The Inside view: tensor shapes beside the model's code, head ablation, float32 against
bfloat16 and float16, and the visitor's KV cache layer by layer."""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
import torch

from ..analysis.inside import Slices, ablate_in_slices, cache_savings, compare_precisions_in_slices, forward_flops, kv_cache_table, model_source, trace_shapes
from ..config import GPTConfig
from ..files.weights import estimated_bytes
from ..formatting import dtype_name, flops, nbytes, percent
from ..model import GPTModel, MultiHeadAttention
from ..plots.inside import cache_work_figure, comparison_figure
from ..plots.style import empty_figure
from ..settings import DTYPES
from ..tokenizer import get_encoding, label
from .components import Plot, csv_button, csv_file
from .controls import Checkbox
from .html import code_html, esc, tok
from .inputs import check_text, prompt_ids
from .outputs import components, skip
from .serving import AppContext, Turns, Visitor, error

#: The shape table's columns and widths; ``line`` is the line of gptviz/model.py a row comes from.
SHAPE_COLUMNS = {"module": "40%", "input": "24%", "output": "24%", "line": "12%"}
COMPARE_HEIGHT, KV_HEIGHT = 440, 320
DEFAULT_HEADS = "0.3, 5.1"
#: Column widths of the two-run top-k tables (ablation): #, run a, p, p, run b, p.
PAIR_WIDTHS = ["6%", "25%", "13%", "17%", "25%", "14%"]
KV_COLUMNS = ["layer", "K shape", "V shape", "allocated shape", "filled", "allocated"]
KV_CURVE_POINTS = 64  # contexts at which the KV view's chart counts the work of a step
LOW_DTYPES = ("bfloat16", "float16")  # compared with float32
#: Long analyses run through the model in slices and give the model back to waiting Steps between
#: them: the first slice is SLICE positions, each next one sized to take about SLICE_SECONDS
#: (124M on 2 CPU cores: ~35 positions in float32, ~10 in float16).
SLICE = 32
SLICE_SECONDS = 0.1


class Shapes(NamedTuple):
    inside_about: str
    shape_table: pd.DataFrame
    code: str


class Ablation(NamedTuple):
    ablate_summary: str
    ablate_table: pd.DataFrame
    ablate_plot: go.Figure


class Precision(NamedTuple):
    precision_summary: str
    precision_table: pd.DataFrame


class Cache(NamedTuple):
    kv_summary: str
    kv_table: pd.DataFrame
    kv_plot: go.Figure
    kv_csv: str | None


def pair_columns(a: str, b: str) -> list[str]:
    """Columns of a two-run top-k table: rank, run a's tokens and p, run b's p of those, run b's own."""
    return ["#", a, f"p {a}", f"p {b}, same token", b, f"p {b}"]


def pair_table(t: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """A :func:`gptviz.analysis.inside.side_by_side` table as shown: pieces with ids, probabilities in %."""
    def tokens(col: str) -> list[str]:
        return [f"{label(i, None, 16)} ({i})" for i in t[col]]

    values = [t["rank"], tokens("a_id"), [percent(p) for p in t["a_p"]], [percent(p) for p in t["b_p_same"]],
              tokens("b_id"), [percent(p) for p in t["b_p"]]]
    return pd.DataFrame(dict(zip(pair_columns(a, b), values)))


def _tree_names(table: pd.DataFrame) -> list[str]:
    """The tracer's module names as a tree: indented by nesting, without the parent's prefix
    (``trf_blocks.0.att.W_query`` under ``trf_blocks.0.att`` is ``W_query``); traced tensors
    and the numbered layers of a Sequential say what they are."""
    names, parents = [], []
    for depth, name, kind in zip(table["depth"], table["module"], table["kind"]):
        del parents[depth:]
        parent = parents[-1] if parents else ""
        inside_parent = parent and name.startswith(parent) and name[len(parent):len(parent) + 1] in (".", ":")
        short = name[len(parent) + 1:] if inside_parent else name
        parents.append(name)
        if kind == "traced tensor":
            short += " (tensor)"
        elif short.isdigit():
            short += f" ({kind})"
        names.append("\u00a0\u00a0" * depth + short)  # non-breaking spaces: the indent survives HTML
    return names


def _heads_text(heads: tuple[tuple[int, int], ...], n_heads: int) -> str:
    """``block 0: all 12 heads; block 5: head 3``."""
    by_block: dict[int, list[int]] = {}
    for layer, head in heads:
        by_block.setdefault(layer, []).append(head)
    return "; ".join(f"block {b}: all {n_heads} heads" if len(hs) == n_heads else
                     f"block {b}: head{'s' if len(hs) > 1 else ''} {', '.join(map(str, hs))}"
                     for b, hs in sorted(by_block.items()))


class InsideView:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.c: dict[str, Any] = {}

    def _input(self, v: Visitor, prompt: str | None) -> tuple[GPTModel, list[int], str]:
        """(model, the tokens the next Step reads, an HTML line saying which): the session's tokens
        if the session belongs to this prompt, else the prompt's; cropped to the context as a step is."""
        ids = prompt_ids(prompt, self.ctx.settings)
        model = self.ctx.model(v)
        with v.lock:
            s = v.session
            generated = len(s.steps) if s is not None and s.prompt_ids == ids else 0
            if generated:
                ids = s.ids
        ctx = model.cfg.context_length
        read = ids[-ctx:]
        text = get_encoding().decode(read)
        tail = text if len(text) <= 160 else "…" + text[-159:]
        what = f"{len(ids) - generated} prompt + {generated} generated tokens" + \
            (f", the last {ctx} of them" if len(ids) > ctx else "")
        about = (f'<div class="about">Inside <b>{esc(v.spec.label)}</b>, on the {len(read)} tokens the next Step '
                 f'reads ({what}): <span class="tokens">{esc(tail)}</span></div>')
        return model, read, about

    # --------------------------------------------------------------- handlers
    def shapes(self, prompt: str, expand: bool, request: gr.Request) -> Shapes:
        """The shape tracer on the tokens the next Step reads: (what is traced, every module call of
        a real forward pass in order with input → output shapes and the line of gptviz/model.py that
        made it, that source with the attention-scores line highlighted). ``expand``: every block
        in full, not only ``trf_blocks.0``."""
        model, ids, about = self._input(self.ctx.visitor(request), prompt)
        table = trace_shapes(model, ids, collapse=not expand)
        shown = table[list(SHAPE_COLUMNS)].assign(module=_tree_names(table))
        scores = table.loc[table["module"].str.endswith(":attn_scores"), "line"]
        return Shapes(about, shown, code_html(int(scores.iloc[0] if len(scores) else table["line"].iloc[0])))

    @staticmethod
    def shape_line(evt: gr.SelectData) -> str:
        """A row of the shape table clicked: the source with that row's line highlighted."""
        try:
            return code_html(int(evt.row_value[list(SHAPE_COLUMNS).index("line")]))
        except (TypeError, ValueError, IndexError):
            return gr.skip()

    @staticmethod
    def _in_slices(work: Slices, idle: Any, progress: gr.Progress | None, desc: str, total: int) -> Iterator[Any]:
        """Drive sliced work, yielding ``idle`` (nothing to redraw) between slices so the model's
        turn passes to waiting Steps, and reporting progress (positions run of ``total``); returns
        the work's result."""
        done = 0
        while True:
            try:
                done += next(work)
            except StopIteration as finished:
                return finished.value
            except ValueError as e:  # the visitor's input did not fit the model
                raise error(f"{e}.") from None
            if progress is not None:
                progress(min(done / total, 1.0), desc=desc)
            yield idle

    @staticmethod
    def _positions(n_tokens: int, forwards: int) -> int:
        """The positions ``forwards`` sliced forwards over ``n_tokens`` run (progress counts them)."""
        return forwards * n_tokens

    def ablation(self, prompt: str, heads: str, request: gr.Request,
                 progress: gr.Progress = gr.Progress()) -> Iterator[Ablation]:
        """Switch attention heads off for the next token (``"0.3, 5.1"``: block.head; ``"L4H*"`` or
        ``"4.*"``: every head of block 4): (summary, top-k normal vs ablated, chart). The shared
        model is not modified: the heads' outputs are zeroed through the forward pass's head mask."""
        v = self.ctx.visitor(request)
        spec = check_text(heads, "list of heads", self.ctx.settings).strip()
        if not spec:
            raise error("Type the heads to switch off as block.head, e.g. 0.3, 5.1, or L4H* for every head of "
                        "block 4.")
        model, ids, _ = self._input(v, prompt)
        work = ablate_in_slices(model, ids, spec, top_k=self.ctx.settings.top_k, slice_len=SLICE,
                                slice_seconds=SLICE_SECONDS)
        r = yield from self._in_slices(work, skip(Ablation), progress, "Switching heads off",
                                       self._positions(len(ids), 2))
        cfg = model.cfg
        normal, ablated = int(r.logits.argmax()), int(r.ablated_logits.argmax())
        verdict = (f'<span class="no">top-1 changed</span>: {tok(normal)} → {tok(ablated)}' if r.top1_changed else
                   f'<span class="yes">top-1 unchanged</span>: {tok(normal)}')
        summary = (f'<div class="summary"><p>Switched off <b>{len(r.heads)} of {cfg.n_layers * cfg.n_heads} '
                   f"heads</b> ({esc(_heads_text(r.heads, cfg.n_heads))}): their outputs are zeroed before "
                   f"out_proj.</p><p>{verdict} · largest logit change <b>{r.max_logit_change:.4g}</b></p></div>")
        shown = r.table["a_id"].tolist()
        shown += [i for i in r.table["b_id"].tolist()[:3] if i not in shown]  # the ablated run's favourites too
        p_normal, p_ablated = torch.softmax(r.logits.float(), -1), torch.softmax(r.ablated_logits.float(), -1)
        figure = comparison_figure(
            [f"{label(i, None, 16)}  ({i})" for i in shown], p_normal[shown].tolist(), p_ablated[shown].tolist(),
            names=("normal", "ablated"), height=COMPARE_HEIGHT,
            title=f"Next token, normal and with {len(r.heads)} head{'s' if len(r.heads) > 1 else ''} off")
        yield Ablation(summary, pair_table(r.table, "normal", "ablated"), figure)

    def precision(self, prompt: str, request: gr.Request,
                  progress: gr.Progress = gr.Progress()) -> Iterator[Precision]:
        """The next token in float32, bfloat16 and float16: (summary: largest logit difference,
        top-1 and top-k agreement, ms per forward; top-k side by side). Each low-precision copy is
        made once per shared model, within the memory limit."""
        v = self.ctx.visitor(request)
        model, ids, _ = self._input(v, prompt)
        if model.dtype != torch.float32:
            raise error(f"This model runs in {v.spec.dtype}: load it in float32 on the Model tab to compare "
                        "float32 with bfloat16 and float16.")
        cfg, limit = model.cfg, self.ctx.settings.max_model_bytes
        need = estimated_bytes(cfg, torch.float32) + sum(estimated_bytes(cfg, DTYPES[d]) for d in LOW_DTYPES)
        if need > limit:
            raise error(f"Comparing precisions keeps a bfloat16 and a float16 copy beside the model: "
                        f"{need / 1e9:.2f} GB in all; this app allows {limit / 1e9:.2f} GB (GPTVIZ_MAX_MODEL_BYTES).")
        repeats = max(1, min(3, 256 // len(ids)))  # timed forwards: fewer on long texts (a 1024-token one takes ~1 s)
        k = min(self.ctx.settings.top_k, cfg.vocab_size)
        lows = [self.ctx.low_precision(v, DTYPES[d]) for d in LOW_DTYPES]  # within the memory budget
        work = compare_precisions_in_slices(model, ids, lows, top_k=k, repeats=repeats, slice_len=SLICE,
                                            slice_seconds=SLICE_SECONDS)
        runs = yield from self._in_slices(work, skip(Precision), progress, "Comparing float32, bfloat16, float16",
                                          self._positions(len(ids), (1 + repeats) * (1 + len(lows))))
        p_ref = torch.softmax(runs[0].logits.float(), -1)
        top_ref = int(p_ref.argmax())
        yes_no = {True: '<span class="yes">{}</span>', False: '<span class="no">{}</span>'}
        head = "".join(f"<th>{dtype_name(r.dtype)}</th>" for r in runs)
        top1 = "".join(f"<td>{tok(int(r.low_logits.argmax()))} "
                       f"{percent(float(torch.softmax(r.low_logits, -1).max()))}</td>" for r in runs)
        times = "".join(f"<td>{r.ms_low:.1f} ms</td>" for r in runs)
        diffs = "".join(f"<td><b>{r.max_abs_diff:.4g}</b></td>" for r in runs)
        agree = "".join("<td>" + yes_no[r.top1_agree].format("agrees" if r.top1_agree else "differs") + " · "
                        + yes_no[r.topk_agree].format(f"{r.topk_overlap} of {k}") + "</td>" for r in runs)
        summary = (
            f'<div class="summary"><table><tr><th></th><th>float32</th>{head}</tr>'
            f"<tr><td>top-1 next token</td><td>{tok(top_ref)} {percent(float(p_ref[top_ref]))}</td>{top1}</tr>"
            f"<tr><td>one forward over {len(ids)} tokens</td><td>{runs[0].ms_reference:.1f} ms</td>{times}</tr>"
            f"<tr><td>largest logit difference from float32</td><td>—</td>{diffs}</tr>"
            f"<tr><td>top-1 · top-{k} shared with float32</td><td>—</td>{agree}</tr></table>"
            "<p>bfloat16 keeps float32's range (8 exponent bits) but only 8 significant bits (2–3 decimal digits); "
            "float16 keeps 11 significant bits (3–4 digits) but a narrow range (largest value 65,504). So float16 "
            "logits usually sit closer to float32's than bfloat16's do; in either, candidates with nearly equal "
            "logits can swap places.</p></div>"
        )
        table = pair_table(runs[0].table, "float32", "bfloat16")
        fp16 = runs[1].table
        table.insert(4, "p float16, same token", [percent(p) for p in fp16["b_p_same"]])
        table["float16"] = [f"{label(i, None, 16)} ({i})" for i in fp16["b_id"]]
        table["p float16"] = [percent(p) for p in fp16["b_p"]]
        yield Precision(summary, table)

    def _work_figure(self, cfg: GPTConfig, now: int) -> go.Figure:
        """FLOPs of one step with and without the KV cache at every context length (``now`` marked)."""
        contexts = sorted({*range(1, cfg.context_length + 1, max(1, cfg.context_length // KV_CURVE_POINTS)),
                           cfg.context_length, now})
        return cache_work_figure(contexts, [forward_flops(cfg, 1, t) for t in contexts],
                                       [forward_flops(cfg, t, t) for t in contexts], now=now, height=KV_HEIGHT,
                                       title="Work of one step as the text grows")

    def kv_cache(self, request: gr.Request) -> Cache:
        """The visitor's KV cache: (what it holds and the work the last step saved against
        recomputing the whole context; per layer the shapes and bytes of its keys and values; the
        work of a step with and without the cache against the context length)."""
        v = self.ctx.visitor(request)
        with v.lock:
            s = v.session
            cache = s.cache if s is not None else None
            if cache is None or not cache.length:
                if s is not None and s.steps and s.steps[-1].cropped:
                    ctx = s.model.cfg.context_length
                    text = (f"The text is longer than the context ({ctx} tokens): cropping shifts every position, so "
                            f"cached keys and values no longer fit; each step recomputes all {ctx} positions, as the "
                            "source does, and no cache is kept.")
                    figure = self._work_figure(s.model.cfg, ctx)
                else:
                    text = ("The cache is empty: press Step on the Generate tab. The first step runs the prompt "
                            "through the model (a prefill) and keeps every layer's keys and values here.")
                    figure = empty_figure("Press Step on the Generate tab", height=KV_HEIGHT)
                return Cache(f'<div class="summary"><p>{text}</p></div>', pd.DataFrame(columns=KV_COLUMNS), figure, None)
            cfg = s.model.cfg
            table = kv_cache_table(cache).rename(columns={"filled bytes": "filled", "allocated bytes": "allocated"})
            table[["filled", "allocated"]] = table[["filled", "allocated"]].map(nbytes)
            if s.steps:
                r = s.steps[-1]
                when, saved = f"Step {len(s.steps)}", cache_savings(cfg, r.context_len, r.positions_computed)
            else:  # back at the prompt, which stays cached
                when, saved = "The next Step", cache_savings(cfg, min(len(s.ids), cfg.context_length), 1)
            n, t = saved.positions_cached, saved.context_len
            ahead = cache.length - t if s.steps and s.next_read_made else 0  # positions the next step's read cached
            explanation = (
                f"With the KV cache this step ran {n} of {t} positions through the model and read the keys and "
                f"values of the other {t - n} from the cache; without it, all {t} positions are recomputed. Work ≈ "
                f"{flops(saved.flops_cached)} instead of {flops(saved.flops_full)} ({saved.saving:.1f}× less). "
                f"Counted: 2·12·d²·L per position for the linear layers, 4·d·L per (query, key) pair for attention, "
                f"2·V·d once for the output head (d={cfg.emb_dim}, L={cfg.n_layers}, V={cfg.vocab_size}).")
            if ahead > 0:
                explanation += (f" The last {'position' if ahead == 1 else f'{ahead} positions'} cached "
                                f"{'belongs' if ahead == 1 else 'belong'} to the next Step: read ahead while "
                                "the model was idle, so that Step runs no forward pass.")
            summary = (
                f'<div class="summary"><p><b>{cache.length} positions cached</b> in each of {cfg.n_layers} layers: '
                f"keys and values of shape (b, n_heads, T, head_dim) = (1, {cfg.n_heads}, {cache.length}, "
                f"{cfg.head_dim}), {nbytes(cache.used_bytes)} filled of {nbytes(cache.nbytes)} allocated (the cache "
                f"grows in chunks of {cache.layers[0].chunk} positions).</p><p><b>{when}</b>: {esc(explanation)}</p>"
                "</div>"
            )
        return Cache(summary, table, self._work_figure(cfg, saved.context_len),
                     csv_file(table, "kv-cache", getattr(request, "session_hash", "")))

    # --------------------------------------------------------------- layout and wiring
    def build(self) -> dict[str, Any]:
        c = self.c
        c["inside_about"] = gr.HTML('<div class="about">The text of the Generate tab is traced when this tab '
                                    "opens.</div>", elem_id="inside-about")
        with gr.Row():
            gr.Markdown("### Tensor shapes beside the code\nEvery module call of one real forward pass (recorded by "
                        "hooks), in order, with input → output shapes. Click a row to see the line of "
                        "`gptviz/model.py` that made it.", elem_id="shapes-intro")
            c["expand"] = Checkbox(False, label="Show every block, not only trf_blocks.0", scale=0, min_width=360,
                                      elem_id="shapes-expand")
        with gr.Row():
            with gr.Column(scale=6):
                c["shape_table"] = gr.Dataframe(pd.DataFrame(columns=list(SHAPE_COLUMNS)), interactive=False,
                                                show_label=False, max_height=500, elem_id="shape-table",
                                                elem_classes="compact", buttons=[],
                                                column_widths=list(SHAPE_COLUMNS.values()))
            with gr.Column(scale=7):
                c["code"] = gr.HTML(code_html(model_source(MultiHeadAttention.forward)[1]), elem_id="model-code")
        gr.Markdown("### Head ablation\nSwitch attention heads off (their outputs zeroed before `out_proj`) and "
                    "compare the next-token candidates; the shared model is not modified.", elem_id="ablate-intro")
        with gr.Row(equal_height=True):
            c["heads_box"] = gr.Textbox(DEFAULT_HEADS, label="Heads to switch off", scale=4, elem_id="ablate-heads",
                                        info="block.head, e.g. 0.3, 5.1 (or L0H3); L4H* is every head of block 4")
            c["ablate_btn"] = gr.Button("Switch off and compare", variant="primary", scale=1, elem_id="ablate-btn")
        with gr.Row():
            with gr.Column(scale=5):
                c["ablate_summary"] = gr.HTML("", elem_id="ablate-summary")
                c["ablate_table"] = gr.Dataframe(pd.DataFrame(columns=pair_columns("normal", "ablated")),
                                                 interactive=False, show_label=False, elem_id="ablate-table",
                                                 elem_classes="compact", wrap=True, buttons=[],
                                                 column_widths=PAIR_WIDTHS)
            with gr.Column(scale=4):
                c["ablate_plot"] = Plot(empty_figure("Press “Switch off and compare”", height=COMPARE_HEIGHT),
                                           show_label=False, elem_id="ablate-plot")
        gr.Markdown("### Precision: float32, bfloat16 and float16\nThe same next-token prediction from the model and "
                    "from a bfloat16 and a float16 copy of it (one copy each per shared model, made on first use).",
                    elem_id="precision-intro")
        c["precision_btn"] = gr.Button("Compare float32, bfloat16 and float16", variant="primary",
                                       elem_id="precision-btn")
        with gr.Row():
            with gr.Column(scale=5):
                c["precision_summary"] = gr.HTML("", elem_id="precision-summary")
            with gr.Column(scale=6):
                c["precision_table"] = gr.Dataframe(pd.DataFrame(columns=pair_columns("float32", "bfloat16")),
                                                    interactive=False, show_label=False, elem_id="precision-table",
                                                    elem_classes="compact", wrap=True, buttons=[])
        gr.Markdown("### KV cache\nWhat the cache of your generation session holds, layer by layer, and the work it "
                    "saves.", elem_id="kv-intro")
        with gr.Row():
            with gr.Column(scale=4):
                c["kv_summary"] = gr.HTML("", elem_id="kv-summary")
                c["kv_plot"] = Plot(empty_figure("Press Step on the Generate tab", height=KV_HEIGHT),
                                       show_label=False, elem_id="kv-plot")
            with gr.Column(scale=5):
                c["kv_table"] = gr.Dataframe(pd.DataFrame(columns=KV_COLUMNS), interactive=False, show_label=False,
                                             max_height=520, elem_id="kv-table", elem_classes="compact", buttons=[],
                                             column_widths=["9%", "19%", "19%", "21%", "15%", "17%"])
                c["kv_csv"] = csv_button("kv-csv")
        return c

    def wire(self, tab: gr.Tab, prompt: gr.Textbox) -> None:
        """``tab``: opening it traces; ``prompt``: the Generate view's prompt box (the text traced)."""
        c, ctx = self.c, self.ctx
        event = ctx.model_event
        slow = Turns.ANALYSIS  # waiting Steps go first
        shown = {**event, "show_progress": "full"}  # slices report progress
        gr.on([tab.select, c["expand"].input], ctx.turns(self.shapes, slow), [prompt, c["expand"]],
              components(Shapes, c),
              api_name="shapes", trigger_mode="always_last", **event).then(
            ctx.turns(self.kv_cache), None, components(Cache, c), api_name="kv_cache", show_progress="hidden")
        c["shape_table"].select(self.shape_line, None, c["code"], api_visibility="private", show_progress="hidden")
        gr.on([c["ablate_btn"].click, c["heads_box"].submit], ctx.turns(self.ablation, slow),
              [prompt, c["heads_box"]], components(Ablation, c), api_name="ablate", **shown)
        c["precision_btn"].click(ctx.turns(self.precision, slow), [prompt], components(Precision, c),
                                 api_name="precision", **shown)
