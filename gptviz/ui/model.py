"""The Model view: which model this visitor explores (random weights of any configuration, the model
trained here and shipped with the app, or released GPT-2 weights, in float32, bfloat16 or float16),
its card, and switching."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr

from ..config import CONFIG_FIELDS, PRESETS, config_from_fields
from ..files.shipped import SHIPPED_NAME, shipped_config, shipped_figures
from ..files.weights import PRETRAINED_NAMES, NeedsHeadsError, WeightsError, estimated_bytes, hub_repo_id, is_allowed_name, load_upload, pretrained_config, weights_source
from ..params import count_params
from ..settings import DTYPES, RANDOM, SEED, SHIPPED
from ..tokenizer import get_encoding
from .generate import Details, Main
from .html import md_code
from .memory import drop_own
from .outputs import components
from .serving import OWN, TRAINED, UPLOAD, AppContext, ModelSpec, Visitor, error

UPLOAD_TYPES = [".safetensors", ".pth", ".pt"]

#: The weights selector: random weights (seed 123), the model trained here, or a released GPT-2.
WEIGHT_CHOICES = ([(f"random weights (seed {SEED})", RANDOM), (f"{SHIPPED_NAME} (trained here, offline)", SHIPPED)]
                  + [(n, n) for n in PRETRAINED_NAMES])


def shipped_origin() -> str:
    """The card's "weights" line of the shipped model, from its training.json."""
    f = shipped_figures()
    line = ("trained here with `gptviz.train` on Shakespeare's plays and The Verdict, shipped in "
            f"`assets/models/{SHIPPED_NAME}` (no network)")
    if f:
        first, second = f["training"]["stage1_plays_and_verdict"], f["training"]["stage2_verdict"]
        line += (f": {first['steps']:,} steps on the plays and the story ({first['tokens_seen']:,} tokens, "
                 f"{first['wall_s'] / 60:.0f} min on one CPU thread), then {second['steps']} on The Verdict alone; "
                 f"sha256 `{f['sha256'][:12]}…`; embedding stored as 8-bit rows, dequantised to float32")
    return line


#: A model switch resets the visitor's Generate view: the card, the sliders, then every output
#: of :class:`~gptviz.ui.generate.Main` and :class:`~gptviz.ui.generate.Details`.
Switched = NamedTuple("Switched", [("card", str), ("layer", Any), ("head", Any), *Main.__annotations__.items(),
                                   *Details.__annotations__.items()])


class ModelView:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.c: dict[str, Any] = {}

    def card(self, v: Visitor) -> str:
        """The visitor's model: where its weights came from, size, device, dtype and configuration."""
        spec = v.spec
        if spec.source in OWN:
            model, loaded = v.own, v.own is not None
        else:
            loaded = spec in self.ctx.models
            model = self.ctx.models.get(spec) if loaded else None
        cfg = model.cfg if model is not None else spec.cfg or (pretrained_config(spec.source)
                                                               if is_allowed_name(spec.source) else None)
        if cfg is None and spec.source == SHIPPED:
            cfg = shipped_config()
        src = weights_source(model) if model is not None else None
        if spec.source == RANDOM:
            origin = f"random initialisation, `torch.manual_seed({SEED})` before `GPTModel(cfg)` (as the source)"
        elif spec.source == SHIPPED:
            origin = shipped_origin()
        elif spec.source == UPLOAD:
            origin = f"your upload {md_code(src.filename if src and src.filename else spec.name)}"
            if src is not None and src.sha256:
                origin += f", sha256 `{src.sha256_prefix}…`"
        elif spec.source == TRAINED:
            origin = f"trained by you on the Train tab: {spec.name}"
        elif is_allowed_name(spec.source):
            kind = "the book's converted GPT-2 weights" if spec.source.startswith("book:") else "released weights"
            origin = f"{kind}, Hugging Face Hub `{hub_repo_id(spec.source)}`"
            if src is not None and src.revision:
                origin += f" at revision `{src.revision[:12]}`"
        else:
            origin = "a checkpoint chosen by the operator"
        rows = [("weights", origin), ("device", str(model.device if model is not None else self.ctx.device)),
                ("dtype", spec.dtype), ("status", "loaded" if loaded else "loads on the first Step")]
        if cfg is not None:
            size = estimated_bytes(cfg, DTYPES[spec.dtype])
            rows += [("parameters", f"{count_params(cfg):,}"), ("memory for weights", f"{size / 1e9:.2f} GB")]
            inferred = " (read from the tensors)" if spec.source == UPLOAD else ""
            rows.append(("config" + inferred, " · ".join(f"`{f}={getattr(cfg, f)}`" for f in CONFIG_FIELDS)))
        table = "\n".join(f"| {k} | {val} |" for k, val in rows)
        note = self.ctx.default_note if spec == self.ctx.default_spec and self.ctx.default_note else ""
        return f"### {spec.label}\n\n{note + chr(10) * 2 if note else ''}| property | value |\n|---|---|\n{table}\n"

    def model_card(self, request: gr.Request) -> str:
        return self.card(self.ctx.visitor(request))

    def _use(self, v: Visitor, spec: ModelSpec, progress: gr.Progress | None, own: Any = None) -> Switched:
        """Switch the visitor to ``spec`` after the memory check (keeping the old model on failure)."""
        size, limit = spec.weight_bytes(), self.ctx.settings.max_model_bytes
        if size is not None and size > limit:
            raise error(f"{spec.label} needs {size / 1e9:.2f} GB for its weights; this app allows "
                        f"{limit / 1e9:.2f} GB (GPTVIZ_MAX_MODEL_BYTES). Choose bfloat16 or a smaller model.")
        if progress is not None and own is None:
            progress(0, desc=f"Loading {spec.label} …")
        model = own if own is not None else self.ctx.model(Visitor(spec), asker=v)  # a failure keeps the old model
        with v.lock:
            v.spec, v.session, v.own = spec, None, own
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
        """The weights selector: random (seed 123, seed-124M), the shipped model or a released GPT-2, in a dtype."""
        if choice == RANDOM:
            spec = ModelSpec(RANDOM, PRESETS["seed-124M"], self._dtype(dtype))
        elif choice == SHIPPED:
            spec = ModelSpec(SHIPPED, None, self._dtype(dtype))
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

    @property
    def upload_off_reason(self) -> str | None:
        """Why visitors may not upload here (None: they may)."""
        s = self.ctx.settings
        if s.allow_upload:
            return None
        if s.on_space:
            return ("Uploads are off on this public Space (each upload takes server memory shared by every "
                    "visitor); the operator can allow them with GPTVIZ_ALLOW_UPLOAD=1, or run gptviz locally.")
        return "Uploads are off on this server (GPTVIZ_ALLOW_UPLOAD=0)."

    def upload(self, file: Any, n_heads: Any, dtype: str, request: gr.Request,
               progress: gr.Progress = gr.Progress()) -> Switched:
        """The visitor's own checkpoint (.safetensors, or the book's .pth read with the restricted
        unpickler): loaded for this visitor only, then the file is deleted."""
        reason = self.upload_off_reason
        if reason is not None:
            raise error(reason)
        if not file:
            raise error("Choose a .safetensors or .pth file first.")
        path = Path(getattr(file, "name", file))
        heads = None
        if n_heads not in (None, "", 0):
            try:
                heads = int(n_heads)
            except (TypeError, ValueError):
                raise error(f"n_heads must be a whole number, got {n_heads!r}.") from None
        s, v = self.ctx.settings, self.ctx.visitor(request)
        progress(0, desc=f"Reading {path.name} …")
        try:
            dtype = self._dtype(dtype)
            with self.ctx.memory.room(self.upload_bytes(path, dtype), f"your file {path.name}", v,
                                      functools.partial(drop_own, v)):
                model = self.ctx.memory.track(load_upload(path, n_heads=heads, device=self.ctx.device,
                                                          dtype=DTYPES[dtype], max_bytes=s.max_upload_bytes,
                                                          max_model_bytes=s.max_model_bytes))
        except NeedsHeadsError as e:
            raise error(f"{path.name}: the number of attention heads cannot be read from the tensors (emb_dim "
                        f"{e.emb_dim} is no released GPT-2's width). Type the n_heads your model was built with, "
                        "then choose the file and press Load again.") from None
        except WeightsError as e:
            raise error(f"Could not load {path.name}: {e}") from None
        finally:
            path.unlink(missing_ok=True)  # the upload is deleted once read (loaded or not)
        src = weights_source(model)
        name = f"{path.name}" + (f" (sha256 {src.sha256_prefix}…)" if src is not None and src.sha256 else "")
        return self.use_own(v, ModelSpec(UPLOAD, model.cfg, dtype, name), model)

    def upload_bytes(self, path: Path, dtype: str) -> int:
        """What reading an upload may hold at its peak, within the memory budget: the file's tensors
        (read whole from a .pth) and the model made from them in ``dtype`` (tensors of 2 or more
        bytes each, so at most the file's size × ``dtype``'s size / 2). A bound: the model is counted
        as it is once loaded. A missing file holds nothing (load_upload says so)."""
        try:
            size = min(path.lstat().st_size, self.ctx.settings.max_upload_bytes)
        except OSError:
            return 0
        return size + size * max(2, DTYPES[dtype].itemsize) // 2

    def use_own(self, v: Visitor, spec: ModelSpec, model: Any) -> Switched:
        """The visitor's own model (an upload, or one trained on the Train tab) becomes theirs to explore;
        beyond ``max_uploads`` such models, other idle visitors' are released."""
        out = self._use(v, spec, None, own=model)
        self.ctx.visitors.admit_upload(v, self.ctx.settings.max_uploads)
        return out

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
                gr.Markdown(f"**{SHIPPED_NAME}** was trained by gptviz itself (chapter 5's loop, on Shakespeare's "
                            "plays and The Verdict) and ships with the app: it loads with no network. "
                            f"Released weights download once from the Hugging Face Hub. A visitor may load or build "
                            f"up to **{self.ctx.settings.max_model_bytes / 1e9:.1f} GB** of weights (gpt2-xl needs "
                            "bfloat16 or float16 for that).", elem_id="model-note")
                c["build_btn"] = gr.Button("Build random weights from the Parameters tab's configuration",
                                           elem_id="build-btn")
                reason = self.upload_off_reason
                with gr.Accordion("Your own model (.safetensors or the book's .pth)", open=reason is None,
                                  elem_id="upload-acc"):
                    gr.Markdown(reason or f"Up to {self.ctx.settings.max_upload_bytes / 1e9:.1f} GB: a file saved "
                                "with `torch.save(model.state_dict(), \"model.pth\")` in chapter 5 (or with its "
                                "optimizer state), the book's converted GPT-2 files, or a GPT-2 `.safetensors`. "
                                "Read with torch's restricted unpickler: a file that holds more than tensors is "
                                "refused and nothing of it runs. Only you see it; it is deleted once loaded.",
                                elem_id="upload-note")
                    with gr.Row():
                        c["upload_file"] = gr.File(label="checkpoint", file_types=UPLOAD_TYPES, type="filepath",
                                                   interactive=reason is None, elem_id="upload-file", scale=3)
                        c["upload_heads"] = gr.Number(None, label="n_heads (if not GPT-2's for its width)",
                                                      precision=0, interactive=reason is None,
                                                      elem_id="upload-heads", scale=1)
                    c["upload_btn"] = gr.Button("Load my file", interactive=reason is None, elem_id="upload-btn")
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
        c["upload_btn"].click(self.upload, [c["upload_file"], c["upload_heads"], c["dtype"]], switched,
                              api_name="upload_model", concurrency_id="load", concurrency_limit=1)
        demo.load(self.model_card, None, c["card"], api_visibility="private")  # on each page load: loaded yet?
