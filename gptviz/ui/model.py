"""The Model view: which model this visitor explores (random weights of any configuration or
released GPT-2 weights, in float32, bfloat16 or float16), its card, and switching."""

from __future__ import annotations

from typing import Any, NamedTuple

import gradio as gr

from ..config import CONFIG_FIELDS, PRESETS, config_from_fields
from ..params import count_params
from ..settings import DTYPES, RANDOM, SEED
from ..tokenizer import get_encoding
from ..weights import PRETRAINED_NAMES, estimated_bytes, is_allowed_name
from .generate import Details, Main
from .outputs import components
from .serving import AppContext, ModelSpec, Visitor, error

#: The weights selector: random weights (seed 123) or a released GPT-2.
WEIGHT_CHOICES = [(f"random weights (seed {SEED})", RANDOM)] + [(n, n) for n in PRETRAINED_NAMES]


#: A model switch resets the visitor's Generate view: the card, the sliders, then every output
#: of :class:`~gptviz.ui.generate.Main` and :class:`~gptviz.ui.generate.Details`.
Switched = NamedTuple("Switched", [("card", str), ("layer", Any), ("head", Any), *Main.__annotations__.items(),
                                   *Details.__annotations__.items()])


class ModelView:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.c: dict[str, Any] = {}

    def card(self, v: Visitor) -> str:
        """The visitor's model: source, size, device, dtype and configuration (Markdown)."""
        spec, models = v.spec, self.ctx.models
        loaded = spec in models
        model = models.get(spec) if loaded else None
        cfg = model.cfg if model is not None else spec.cfg or PRESETS.get(spec.source)
        if spec.source == RANDOM:
            origin = f"random initialisation, `torch.manual_seed({SEED})` before `GPTModel(cfg)` (as the source)"
        elif is_allowed_name(spec.source):
            origin = f"released GPT-2 weights, Hugging Face Hub `openai-community/{spec.source}`"
        else:
            origin = "a checkpoint chosen by the operator"
        rows = [("weights", origin), ("device", str(model.device if model is not None else self.ctx.device)),
                ("dtype", spec.dtype), ("status", "loaded" if loaded else "loads on the first Step")]
        if cfg is not None:
            size = estimated_bytes(cfg, DTYPES[spec.dtype])
            rows += [("parameters", f"{count_params(cfg):,}"), ("memory for weights", f"{size / 1e9:.2f} GB")]
            rows.append(("config", " · ".join(f"`{f}={getattr(cfg, f)}`" for f in CONFIG_FIELDS)))
        table = "\n".join(f"| {k} | {val} |" for k, val in rows)
        return f"### {spec.label}\n\n| property | value |\n|---|---|\n{table}\n"

    def model_card(self, request: gr.Request) -> str:
        return self.card(self.ctx.visitor(request))

    def _use(self, v: Visitor, spec: ModelSpec, progress: gr.Progress | None) -> Switched:
        """Switch the visitor to ``spec`` after the memory check (keeping the old model on failure)."""
        size, limit = spec.weight_bytes(), self.ctx.settings.max_model_bytes
        if size is not None and size > limit:
            raise error(f"{spec.label} needs {size / 1e9:.2f} GB for its weights; this app allows "
                        f"{limit / 1e9:.2f} GB (GPTVIZ_MAX_MODEL_BYTES). Choose bfloat16 or a smaller model.")
        if progress is not None:
            progress(0, desc=f"Loading {spec.label} …")
        model = self.ctx.model(Visitor(spec))  # loads outside the visitor's lock; a failure keeps the old model
        with v.lock:
            v.spec, v.session = spec, None
        gr.Info(f"Now using {spec.label}: press Step on the Generate tab.")
        message = f"Model changed to {spec.label}: press Step"
        cfg = model.cfg
        return Switched(self.card(v), gr.Slider(maximum=max(1, cfg.n_layers - 1), value=0),  # maximum > minimum
                        gr.Slider(maximum=max(1, cfg.n_heads - 1), value=0), *Main.blank(message),
                        *Details.blank(message))

    @staticmethod
    def _dtype(dtype: Any) -> str:
        if dtype not in DTYPES:
            raise error(f"Unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
        return dtype

    def load_weights(self, choice: str, dtype: str, request: gr.Request,
                     progress: gr.Progress = gr.Progress(track_tqdm=True)) -> Switched:
        """The weights selector: random (seed 123, seed-124M) or a released GPT-2, in a dtype."""
        if choice == RANDOM:
            spec = ModelSpec(RANDOM, PRESETS["seed-124M"], self._dtype(dtype))
        elif is_allowed_name(choice):
            spec = ModelSpec(choice, None, self._dtype(dtype))
        else:
            raise error(f"Unknown weights {choice!r}: choose one of {', '.join(v for _, v in WEIGHT_CHOICES)}.")
        return self._use(self.ctx.visitor(request), spec, progress)

    def build_custom(self, vocab_size: Any, context_length: Any, emb_dim: Any, n_heads: Any, n_layers: Any,
                     drop_rate: Any, qkv_bias: Any, tie_weights: Any, dtype: str, request: gr.Request,
                     progress: gr.Progress = gr.Progress()) -> Switched:
        """Random weights (seed 123) for the Parameters view's configuration, within the memory limit."""
        try:
            cfg = config_from_fields(vocab_size, context_length, emb_dim, n_heads, n_layers, drop_rate, qkv_bias,
                                     tie_weights)
        except ValueError as e:
            raise error(f"Invalid configuration on the Parameters tab: {e}.") from None
        n_vocab = get_encoding().n_vocab
        if cfg.vocab_size != n_vocab:
            raise error(f"vocab_size must be {n_vocab} to generate with the GPT-2 tokenizer "
                        f"(the Parameters tab has {cfg.vocab_size:,}).")
        return self._use(self.ctx.visitor(request), ModelSpec(RANDOM, cfg, self._dtype(dtype)), progress)

    # --------------------------------------------------------------- layout and wiring
    def build(self) -> dict[str, Any]:
        c, spec0 = self.c, self.ctx.default_spec
        with gr.Row():
            with gr.Column(scale=2):
                choices = dict(WEIGHT_CHOICES).values()
                c["weights"] = gr.Radio(WEIGHT_CHOICES, value=spec0.source if spec0.source in choices else RANDOM,
                                        label="Weights", elem_id="weights-choice")
                c["dtype"] = gr.Radio(list(DTYPES), value=spec0.dtype, label="dtype", elem_id="dtype-choice")
                c["load_btn"] = gr.Button("Load these weights", variant="primary", elem_id="load-btn")
                gr.Markdown(f"Released weights download once from the Hugging Face Hub. A visitor may load or build "
                            f"up to **{self.ctx.settings.max_model_bytes / 1e9:.1f} GB** of weights (gpt2-xl needs "
                            "bfloat16 or float16 for that).", elem_id="model-note")
                c["build_btn"] = gr.Button("Build random weights from the Parameters tab's configuration",
                                           elem_id="build-btn")
            with gr.Column(scale=3):
                c["card"] = gr.Markdown(self.card(Visitor(spec0)), elem_id="model-card")
        return c

    def wire(self, demo: gr.Blocks, generate: dict[str, Any], fields: list[Any]) -> None:
        """``generate``: the Generate view's components (reset on a switch); ``fields``: the
        Parameters view's eight configuration inputs (Build random weights reads them)."""
        c = self.c
        switched = components(Switched, c, generate)
        c["load_btn"].click(self.load_weights, [c["weights"], c["dtype"]], switched, api_name="load_model",
                            concurrency_id="load", concurrency_limit=1)
        c["build_btn"].click(self.build_custom, [*fields, c["dtype"]], switched, api_name="build_model",
                             concurrency_id="load", concurrency_limit=1)
        demo.load(self.model_card, None, c["card"], api_visibility="private")  # on each page load: loaded yet?
