"""The models a visitor can have: :class:`ModelSpec` (what to build or load, in which dtype),
the start-up model (:func:`start_model`: ``GPTVIZ_WEIGHTS``, or on a Space gpt2 when the Hub
answers, else the model shipped in ``assets/``) and :func:`build_model`, which makes one."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import PRESETS, GPTConfig
from ..files.shipped import SHIPPED_NAME, load_shipped, shipped_config
from ..files.weights import WeightsSource, estimated_bytes, hub_answers, is_allowed_name, load_pretrained
from ..kernels import choose_kernels
from ..model import GPTModel
from ..settings import DTYPES, GPT2_OR_SHIPPED, RANDOM, SEED, SHIPPED, Settings

__all__ = ["UPLOAD", "TRAINED", "OWN", "ModelSpec", "start_model", "build_model"]

@dataclass(frozen=True)
class ModelSpec:
    """What a shared model is made from; the key of the :class:`ModelStore`."""

    source: str  # RANDOM, SHIPPED, an allowed name, UPLOAD, TRAINED, or an operator's checkpoint path / repo id
    cfg: GPTConfig | None = None  # the configuration of random weights (and of an upload)
    dtype: str = "float32"
    name: str = ""  # an upload: its file name and sha256 prefix

    @property
    def preset(self) -> str | None:
        """The preset name of random weights' configuration (None if custom or not random)."""
        return next((n for n, c in PRESETS.items() if c == self.cfg), None)

    @property
    def label(self) -> str:
        if self.source == RANDOM:
            return f"random weights (seed {SEED}), {self.preset or 'custom configuration'}, {self.dtype}"
        if is_allowed_name(self.source):
            return f"{self.source}, {self.dtype}"
        if self.source == SHIPPED:
            return f"{SHIPPED_NAME} (trained here, offline), {self.dtype}"
        if self.source == UPLOAD:
            return f"your file {self.name}, {self.dtype}"
        if self.source == TRAINED:
            return f"the model you trained: {self.name}, {self.dtype}"
        return f"the operator's checkpoint, {self.dtype}"  # never show a server path to visitors

    def weight_bytes(self) -> int | None:
        """Estimated bytes of the loaded model; None for an operator's path (its size is unknown)."""
        if self.source in (RANDOM, *OWN):
            return estimated_bytes(self.cfg, DTYPES[self.dtype])
        if is_allowed_name(self.source):
            return estimated_bytes(self.source, DTYPES[self.dtype])
        if self.source == SHIPPED and (cfg := shipped_config()) is not None:  # None: its file is missing
            return estimated_bytes(cfg, DTYPES[self.dtype])
        return None

    def peak_bytes(self) -> int:
        """Bytes while it is made: random weights are initialised in float32, then converted."""
        size = self.weight_bytes() or 0
        return size + (estimated_bytes(self.cfg, torch.float32) if self.source == RANDOM and self.dtype != "float32"
                       else 0)

    @classmethod
    def default(cls, settings: Settings, hub: Callable[[], tuple[bool, str]] = hub_answers) -> "ModelSpec":
        """The model every visitor starts with: ``GPTVIZ_WEIGHTS`` in ``GPTVIZ_DTYPE`` (:func:`start_model`)."""
        return start_model(settings, hub)[0]


def start_model(settings: Settings, hub: Callable[[], tuple[bool, str]] = hub_answers) -> tuple[ModelSpec, str]:
    """The start-up model and a line saying why, for the Model view ("" when the operator chose it).
    ``random`` (the default locally and in CI): the source's seeded model. ``gpt2-or-shipped`` (a
    Space's default): ``gpt2`` when ``hub()`` says its files can be had, else the shipped model."""
    if settings.weights == RANDOM:
        return ModelSpec(RANDOM, PRESETS["seed-124M"], settings.dtype), ""
    if settings.weights != GPT2_OR_SHIPPED:
        return ModelSpec(settings.weights, None, settings.dtype), ""
    answered, why = hub()
    if answered:
        return ModelSpec("gpt2", None, settings.dtype), f"This app started on **gpt2**: {why}."
    return ModelSpec(SHIPPED, None, settings.dtype), (
        f"This app started on **{SHIPPED_NAME}**, the model trained here and shipped with the app, because {why} "
        "when it started, so gpt2 could not be downloaded.")


UPLOAD = "upload"  # a visitor's own checkpoint: held by that visitor, never in the shared store
TRAINED = "trained"  # a model the visitor trained on the Train view: theirs alone, as an upload is
OWN = (UPLOAD, TRAINED)  # the sources whose model the visitor holds (Visitor.own)
_SEED_LOCK = threading.Lock()  # seeding and initialising a random model is one atomic act


def build_model(spec: ModelSpec, device: torch.device) -> GPTModel:
    """Make the model a spec describes, on ``device``, in eval mode."""
    dtype = DTYPES[spec.dtype]
    if spec.source == SHIPPED:  # assets/models/: no network
        model = load_shipped(device=device, dtype=dtype)
    elif spec.source != RANDOM:
        model = load_pretrained(spec.source, device=device, dtype=dtype)
    else:
        with _SEED_LOCK, torch.random.fork_rng(devices=[]):  # seeded init, without disturbing anyone's RNG
            torch.manual_seed(SEED)
            model = GPTModel(spec.cfg)
        model = model.to(device=device, dtype=dtype).eval()
        model.weights_source = WeightsSource.random(spec.cfg, SEED)
    choose_kernels(model)  # NEW (speed): its shapes' CPU kernels timed now, not in a visitor's first Step
    return model
