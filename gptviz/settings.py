"""Every ``GPTVIZ_*`` variable and every limit, read once into a frozen :class:`Settings`.

Nothing else in gptviz reads the environment for its behaviour: the app builds one
``Settings.from_env()`` at start and passes it down; tests build their own ``Settings(...)``.

| variable | default | meaning |
|---|---|---|
| ``GPTVIZ_WEIGHTS`` | ``random``; on a Space ``gpt2-or-shipped`` | the model every visitor starts with: ``random`` (the source's seed-124M configuration, seed 123), ``shipped`` (the model trained here, in ``assets/models/``, offline), ``gpt2-or-shipped`` (``gpt2`` when the Hugging Face Hub answers at start, else ``shipped``), an allowed name (``gpt2`` …, ``distilgpt2``, ``book:gpt2-small-124M`` …), or, for operators, ``hf:owner/name[@revision]`` or a local checkpoint |
| ``GPTVIZ_DTYPE`` | ``float32`` | dtype of that model: ``float32``, ``bfloat16`` or ``float16`` |
| ``GPTVIZ_DEVICE`` | best available | ``cpu``, ``cuda``, ``mps`` … |
| ``GPTVIZ_MAX_MODEL_BYTES`` | 4 GB | weights a visitor may build or load |
| ``GPTVIZ_MAX_TOTAL_BYTES`` | 60 % of the machine's memory | everything the app holds, for all visitors together: the app itself, every model, copy, upload, generation cache and training (:mod:`gptviz.ui.memory`) |
| ``GPTVIZ_ALLOW_UPLOAD`` | on locally, off on a Space | visitors may upload their own checkpoint |
| ``GPTVIZ_MAX_UPLOAD_BYTES`` | 1 GB | size limit of one upload |
| ``GPTVIZ_MAX_TRAININGS`` | 2 | trainings on the Train view at once (others wait in line) |
| ``GPTVIZ_READ_AHEAD`` | on | read a visitor's next step while the model is idle (``0``: off) |
| ``GPTVIZ_KERNEL`` | ``auto`` | float32 products on the CPU: ``auto`` (the faster kernel per weight shape, timed at start), ``F.linear`` or ``oneDNN`` |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import psutil
import torch

from .kernels import KERNEL_POLICIES

__all__ = ["Settings", "select_device", "DTYPES", "RANDOM", "SHIPPED", "GPT2_OR_SHIPPED", "SEED"]

RANDOM = "random"  # GPTVIZ_WEIGHTS: random weights, seeded as in the source
SHIPPED = "shipped"  # GPTVIZ_WEIGHTS: the model trained here and shipped in assets/models/ (offline)
GPT2_OR_SHIPPED = "gpt2-or-shipped"  # a Space's default: gpt2 when the Hub answers at start, else SHIPPED
SEED = 123  # torch.manual_seed(123) before GPTModel(cfg), as in the source
#: The dtypes a model may run in, by the name the UI and the API use.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def select_device(override: str | None = None) -> torch.device:
    """``override`` if given (e.g. ``"cpu"``), else ``GPTVIZ_DEVICE`` if set, else cuda if
    available, else mps, else cpu. (The library's default for ``load_pretrained`` & co; the app
    passes its :class:`Settings` instead.)"""
    override = override or os.environ.get("GPTVIZ_DEVICE", "").strip()
    if override:
        return torch.device(override)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


#: The share of the machine's memory the app may use in all, unless GPTVIZ_MAX_TOTAL_BYTES says.
TOTAL_SHARE = 0.6
#: A container's memory limit (cgroup v2, then v1): a Space's machine reports the host's memory.
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def machine_bytes() -> int:
    """The memory this process may have: the machine's, or its container's limit if lower."""
    total = psutil.virtual_memory().total
    for path in CGROUP_LIMITS:
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit():  # "max": no limit
            total = min(total, int(raw))
    return total


def default_total_bytes() -> int:
    return int(TOTAL_SHARE * machine_bytes())


def _flag(raw: str | None) -> bool | None:
    if raw is None or not raw.strip():
        return None
    return raw.strip().lower() in ("1", "true", "yes", "on")


def _bytes(raw: str | None, default: int) -> int:
    return int(float(raw)) if raw and raw.strip() else default


@dataclass(frozen=True)
class Settings:
    """What the operator chose and the limits that protect every visitor."""

    weights: str = RANDOM
    dtype: str = "float32"
    device: str = ""  # "" = best available (select_device)
    max_model_bytes: int = 4_000_000_000
    max_total_bytes: int = field(default_factory=default_total_bytes)  # GPTVIZ_MAX_TOTAL_BYTES: all visitors'
    allow_upload: bool = True
    max_upload_bytes: int = 1_000_000_000
    on_space: bool = False  # running on a Hugging Face Space (SPACE_ID is set)
    # --- limits of one visitor's work
    max_text_chars: int = 20_000  # tokenizer text, prompts and id lists
    max_prompt_tokens: int = 1_024
    max_chips: int = 2_048  # tokens drawn as chips and table rows
    max_steps_per_click: int = 64  # Step ×N
    max_session_tokens: int = 2_048  # prompt + generated tokens in one session
    attn_window: int = 64  # heatmaps show the attention among the last this many tokens
    lens_steps: int = 24  # logit lens: the last this many steps
    top_k: int = 10
    session_ttl_s: int = 3_600  # a visitor's state is dropped an hour after its last update
    max_live_sessions: int = 48  # generation sessions kept at once (each within 64 MB)
    max_sessions: int = 1_000  # Gradio's per-session records, least recently used dropped
    model_concurrency: int = 16  # model events admitted at once (they take turns on the model)
    model_store_capacity: int = 3  # shared models kept built
    max_uploads: int = 2  # visitors' own uploaded models held at once (least recently used released)
    max_trainings: int = 2  # Train view trainings at once (GPTVIZ_MAX_TRAININGS); the others wait in line
    max_train_text_bytes: int = 2_000_000  # a training text pasted or uploaded on the Train view
    read_ahead: bool = True  # a visitor's next step read while the model is idle (GPTVIZ_READ_AHEAD=0: off)
    cpu_kernel: str = "auto"  # GPTVIZ_KERNEL: gptviz.kernels.KERNEL_POLICIES

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"GPTVIZ_DTYPE must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.max_total_bytes <= 0:
            raise ValueError(f"GPTVIZ_MAX_TOTAL_BYTES must be a positive number of bytes, got {self.max_total_bytes}")
        if self.cpu_kernel not in KERNEL_POLICIES:
            raise ValueError(f"GPTVIZ_KERNEL must be one of {', '.join(KERNEL_POLICIES)}, got {self.cpu_kernel!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        on_space = bool(env.get("SPACE_ID"))
        upload = _flag(env.get("GPTVIZ_ALLOW_UPLOAD"))
        return cls(
            weights=env.get("GPTVIZ_WEIGHTS", "").strip() or (GPT2_OR_SHIPPED if on_space else RANDOM),
            dtype=env.get("GPTVIZ_DTYPE", "").strip() or "float32",
            device=env.get("GPTVIZ_DEVICE", "").strip(),
            max_model_bytes=_bytes(env.get("GPTVIZ_MAX_MODEL_BYTES"), cls.max_model_bytes),
            max_total_bytes=_bytes(env.get("GPTVIZ_MAX_TOTAL_BYTES"), default_total_bytes()),
            allow_upload=(not on_space) if upload is None else upload,
            max_upload_bytes=_bytes(env.get("GPTVIZ_MAX_UPLOAD_BYTES"), cls.max_upload_bytes),
            on_space=on_space,
            max_trainings=max(1, int(env.get("GPTVIZ_MAX_TRAININGS", "").strip() or cls.max_trainings)),
            read_ahead=_flag(env.get("GPTVIZ_READ_AHEAD")) is not False,
            cpu_kernel=env.get("GPTVIZ_KERNEL", "").strip() or "auto",
        )

    @property
    def torch_device(self) -> torch.device:
        return select_device(self.device or None)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
