"""The Parameters view: the parameter count of any configuration, where the parameters live,
memory and FLOPs per token — closed-form, so even GPT-3-sized shapes answer at once."""

from __future__ import annotations

from typing import Any, NamedTuple

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from ..config import CONFIG_FIELDS, PRESETS, GPTConfig, config_from_fields
from ..params import count_params, format_breakdown, memory_and_compute, nearest_preset, param_breakdown
from ..plots.params import params_figure
from .components import Plot, csv_button, csv_file
from .outputs import components, skip
from .serving import AppContext, error

CUSTOM = "custom"
CHART_HEIGHT = 560
#: Columns of the breakdown shown on the page (the formula carries the shapes), with their widths.
BREAKDOWN_COLUMNS = {"component": "15%", "module": "18%", "formula": "18%", "params each": "9%", "×": "4%",
                     "total": "9%", "% of model": "7%", "note": "20%"}


class Counted(NamedTuple):
    p_total: str
    preset_dd: str
    p_table: pd.DataFrame
    p_chart: go.Figure
    p_memory: pd.DataFrame
    p_csv: str
    mem_csv: str


#: A preset chosen: the eight fields, then what :class:`Counted` fills.
Preset = NamedTuple("Preset", [(f"cfg_{f}", Any) for f in CONFIG_FIELDS] + list(Counted.__annotations__.items()))


def preset_name(cfg: GPTConfig) -> str:
    return next((name for name, c in PRESETS.items() if c == cfg), CUSTOM)


class ParametersView:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.c: dict[str, Any] = {}

    @staticmethod
    def counted(cfg: GPTConfig) -> Counted:
        """(total, preset name, breakdown table, chart, memory and FLOPs table) of a configuration."""
        total, near, mem, name = count_params(cfg), nearest_preset(cfg), memory_and_compute(cfg), preset_name(cfg)
        what = "the source's GPT_CONFIG_124M" if name == "seed-124M" else name if name != CUSTOM else "custom"
        summary = (
            f"## {total:,} parameters\n"
            f"{what} · nearest released GPT-2: **{near.name}** ({near.params:,}; this is {near.ratio:.2f}×) · "
            f"weights {mem.loc['weights_fp32', 'readable']} in fp32, {mem.loc['weights_bf16', 'readable']} in "
            f"bf16 · {mem.loc['flops_token_with_head', 'readable']} per token forward"
        )
        table = format_breakdown(param_breakdown(cfg))[list(BREAKDOWN_COLUMNS)]
        memory = mem[["quantity", "readable", "formula"]].rename(columns={"readable": "value"})
        return Counted(summary, name, table, params_figure(cfg, height=CHART_HEIGHT), memory,
                       csv_file(table, f"parameters-{name}"), csv_file(memory, f"memory-{name}"))

    def params(self, vocab_size: Any, context_length: Any, emb_dim: Any, n_heads: Any, n_layers: Any,
               drop_rate: Any, qkv_bias: Any, tie_weights: Any) -> Counted:
        """Any configuration → (total, preset, table, chart, memory). An invalid field gives a
        warning naming it and keeps the last valid result on screen."""
        try:
            cfg = config_from_fields(vocab_size, context_length, emb_dim, n_heads, n_layers, drop_rate, qkv_bias,
                                     tie_weights)
            return self.counted(cfg)
        except ValueError as e:
            gr.Warning(f"Invalid configuration: {e}. The last valid result stays on screen.", duration=5)
            return skip(Counted)

    def preset(self, name: str) -> Preset:
        """A preset chosen → its eight field values, then the same outputs as :meth:`params`."""
        if name not in PRESETS:
            if name == CUSTOM:
                return skip(Preset)
            raise error(f"Unknown preset {name!r}: choose one of {', '.join(PRESETS)}.")
        cfg = PRESETS[name]
        return Preset(*(getattr(cfg, f) for f in CONFIG_FIELDS), *self.counted(cfg))

    # --------------------------------------------------------------- layout and wiring
    def build(self) -> dict[str, Any]:
        c, base = self.c, PRESETS["seed-124M"]
        first = self.counted(base)
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                c["preset_dd"] = gr.Dropdown([*PRESETS, CUSTOM], value="seed-124M", label="Preset", elem_id="preset")
                numbers, flags = CONFIG_FIELDS[:6], CONFIG_FIELDS[6:]
                for pair in (numbers[0:2], numbers[2:4], numbers[4:6]):
                    with gr.Row():
                        for f in pair:
                            c[f"cfg_{f}"] = gr.Number(getattr(base, f), label=f, elem_id=f"cfg-{f}", precision=None,
                                                      min_width=120)
                with gr.Row():
                    for f in flags:
                        c[f"cfg_{f}"] = gr.Checkbox(getattr(base, f), label=f, elem_id=f"cfg-{f}")
            with gr.Column(scale=3):
                c["p_total"] = gr.Markdown(first.p_total, elem_id="params-total")
                c["p_chart"] = Plot(first.p_chart, show_label=False, elem_id="params-chart")
        c["p_table"] = gr.Dataframe(first.p_table, label="Parameter breakdown (as the source counts them)",
                                    interactive=False, wrap=True, elem_id="params-table", max_height=680,
                                    elem_classes="compact", column_widths=list(BREAKDOWN_COLUMNS.values()))
        c["p_csv"] = csv_button("params-csv", first.p_csv)
        c["p_memory"] = gr.Dataframe(first.p_memory, label="Memory and compute (batch 1)", interactive=False,
                                     wrap=True, elem_id="params-memory", column_widths=["30%", "12%", "58%"])
        c["mem_csv"] = csv_button("memory-csv", first.mem_csv)
        return c

    @property
    def fields(self) -> list[Any]:
        """The eight configuration inputs, in :data:`~gptviz.config.CONFIG_FIELDS` order."""
        return [self.c[f"cfg_{f}"] for f in CONFIG_FIELDS]

    def wire(self) -> None:
        c = self.c
        gr.on([f.input for f in self.fields], self.params, self.fields, components(Counted, c), api_name="params",
              trigger_mode="always_last", show_progress="hidden")
        c["preset_dd"].input(self.preset, c["preset_dd"], components(Preset, c), api_name="preset",
                             show_progress="hidden")
