"""Weights for :class:`~gptviz.model.GPTModel`: the released GPT-2 models, the book's own files,
and checkpoints readers trained themselves.

What :func:`load_pretrained` reads:

* a name of :data:`PRETRAINED_NAMES` (the visitors' allow-list), downloaded through
  huggingface_hub into its standard cache (``HF_HOME``; a cached copy is used offline):

  - ``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl`` (``openai-community/<name>``) and
    ``distilgpt2`` (``distilbert/distilgpt2``, 6 blocks, 82M parameters): ``model.safetensors``
    and ``config.json`` in Hugging Face GPT-2 layout;
  - ``book:gpt2-small-124M``, ``book:gpt2-medium-355M``, ``book:gpt2-large-774M``,
    ``book:gpt2-xl-1558M``: the book companion's conversion of the same weights to the book's
    own names (``rasbt/gpt2-from-scratch-pytorch``, ``gpt2-small-124M.pth`` …), read as a
    ``.pth`` below;

* ``"hf:owner/name"`` (optionally ``"hf:owner/name@revision"``): any Hub repository in GPT-2
  layout. This prefix is the operator's explicit way to the Hub (Python, ``GPTVIZ_WEIGHTS``);
  a plain ``"owner/name"`` is a path, never a Hub id;

* a local path: a directory holding ``model.safetensors`` and ``config.json``; a
  ``.safetensors`` file (with ``config.json`` beside it, or else its configuration inferred from
  its tensors, which may carry Hugging Face or the book's names); or a ``.pth`` / ``.pt`` file
  saved the book's way, ``torch.save(model.state_dict(), "model.pth")`` or
  ``torch.save({"model_state_dict": …, "optimizer_state_dict": …}, …)`` (the optimizer's state is
  ignored). ``.pth`` files are read with ``torch.load(weights_only=True)``, PyTorch's restricted
  unpickler: a file whose pickle asks for anything beyond tensors is refused and nothing in it
  runs. Other pickles (``.bin``, ``.ckpt``, ``.pkl``) are refused unread.

:func:`load_upload` is the visitors' door for one uploaded file (size limit first, then
``.safetensors`` or ``.pth`` / ``.pt``, configuration always from the tensors, nothing beside
the file read).

How a checkpoint is read and checked (the Hugging Face → book name table, the ``.pth`` reader,
the mask check) is in :mod:`gptviz.files.checkpoints`; its configuration from ``config.json`` or its
tensors, the errors and :class:`WeightsSource` in :mod:`gptviz.files.checkpoint_config`. This module
re-exports their public names.

Every loaded model carries ``model.weights_source``, a :class:`WeightsSource` saying where its
weights came from (Hub repo and revision, or file name and sha256, and the configuration).

Security: only the operator passes paths and ``hf:`` ids (Python, an environment variable).
Anything a visitor chose must pass :func:`is_allowed_name` first; a string that is an allowed
name always means the Hub model. A visitor's upload goes through :func:`load_upload` only.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.utils import silent_tqdm

from ..config import PRESETS, GPTConfig
from ..model import GPTModel
from ..settings import select_device
from .checkpoint_config import GPT2_HEADS, CheckpointError, NeedsHeadsError, TooLargeError, WeightsError, WeightsSource, config_from_hf, config_from_hf_shapes, config_from_state_dict, model_bytes, weights_source
from .checkpoints import _PICKLE_SUFFIXES, _PTH_SUFFIXES, _load_hf, _load_pth, _load_safetensors_alone, _sha256, load_upload

__all__ = [
    "PRETRAINED_NAMES",
    "RELEASED_NAMES",
    "BOOK_NAMES",
    "GPT2_HEADS",
    "Pretrained",
    "WeightsSource",
    "WeightsError",
    "CheckpointError",
    "NeedsHeadsError",
    "TooLargeError",
    "is_allowed_name",
    "hub_answers",
    "hub_repo_id",
    "pretrained_info",
    "pretrained_config",
    "config_from_hf",
    "config_from_hf_shapes",
    "config_from_state_dict",
    "estimated_bytes",
    "load_pretrained",
    "load_upload",
    "weights_source",
]

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
BOOK_REPO = "rasbt/gpt2-from-scratch-pytorch"
HF_PREFIX = "hf:"  # the operator's explicit way to any Hub repository
_ALL_PICKLES = _PICKLE_SUFFIXES + _PTH_SUFFIXES


@dataclass(frozen=True)
class Pretrained:
    """One entry of the allow-list: where its file lies and the model it holds."""

    name: str  # as visitors see and choose it
    repo_id: str  # Hugging Face Hub repository
    filename: str  # the weights file in it
    layout: str  # "hf": model.safetensors + config.json; "book": the book's state dict (.pth)
    config: GPTConfig  # what the file holds (estimated_bytes works before downloading)


def _released(name: str, repo_id: str, cfg: GPTConfig) -> Pretrained:
    return Pretrained(name, repo_id, WEIGHTS_FILE, "hf", cfg)


def _book(size: str, preset: str) -> Pretrained:
    # The book's conversion copies wte into out_head: equal tensors, loaded tied.
    return Pretrained(f"book:gpt2-{size}", BOOK_REPO, f"gpt2-{size}.pth", "book", PRESETS[preset])


_PRETRAINED: dict[str, Pretrained] = {
    p.name: p
    for p in (
        *(_released(n, f"openai-community/{n}", PRESETS[n]) for n in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")),
        _released("distilgpt2", "distilbert/distilgpt2", PRESETS["gpt2"].replace(n_layers=6)),
        _book("small-124M", "gpt2"),
        _book("medium-355M", "gpt2-medium"),
        _book("large-774M", "gpt2-large"),
        _book("xl-1558M", "gpt2-xl"),
    )
}
#: The Hugging Face GPT-2 checkpoints of the allow-list, in the order the app lists them.
RELEASED_NAMES = tuple(n for n, p in _PRETRAINED.items() if p.layout == "hf")
#: The book companion's converted files (``rasbt/gpt2-from-scratch-pytorch``).
BOOK_NAMES = tuple(n for n, p in _PRETRAINED.items() if p.layout == "book")
#: Everything a visitor may choose: :data:`RELEASED_NAMES` then :data:`BOOK_NAMES`.
PRETRAINED_NAMES = RELEASED_NAMES + BOOK_NAMES


def is_allowed_name(name: object) -> bool:
    """True for the names of :data:`PRETRAINED_NAMES` only: the one check visitor input must pass."""
    return isinstance(name, str) and name in _PRETRAINED


def pretrained_info(name: str) -> Pretrained:
    """The allow-list entry of ``name`` (:class:`WeightsError` for any other string)."""
    if not is_allowed_name(name):
        raise WeightsError(f"unknown model name {name!r}: choose one of {', '.join(PRETRAINED_NAMES)}")
    return _PRETRAINED[name]


def hub_repo_id(name: str) -> str:
    """``"gpt2-xl"`` → ``"openai-community/gpt2-xl"``, ``"distilgpt2"`` → ``"distilbert/distilgpt2"``,
    ``"book:gpt2-small-124M"`` → ``"rasbt/gpt2-from-scratch-pytorch"``."""
    return pretrained_info(name).repo_id


def pretrained_config(name: str) -> GPTConfig:
    """The configuration of an allowed name's model, known before downloading it."""
    return pretrained_info(name).config


# --------------------------------------------------------------------------- memory


def estimated_bytes(name_or_cfg: str | GPTConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the loaded model holds: its parameters in ``dtype`` (the tied head counted once,
    :func:`~gptviz.params.count_params`) plus one causal mask per block (context², 1-byte bool).

    ``name_or_cfg`` is a name of :data:`PRETRAINED_NAMES` or a :class:`GPTConfig`. Loading
    briefly needs a little more: the tensor being read and converted (at most one embedding matrix).
    """
    cfg = pretrained_config(name_or_cfg) if isinstance(name_or_cfg, str) else GPTConfig.coerce(name_or_cfg)
    return model_bytes(cfg, dtype)




# --------------------------------------------------------------------------- where the files are


def _refused_pickle(path: Path) -> WeightsError:
    return WeightsError(
        f"{path}: pickled checkpoints are refused (they can run code); use {WEIGHTS_FILE} or a .pth/.pt state dict"
    )


def _local(path: Path) -> tuple[str, Path, Path | None]:
    """(how to read it, the weights file, config.json or None) of a local checkpoint."""
    suffix = path.suffix.lower()
    if suffix in _PICKLE_SUFFIXES:
        raise _refused_pickle(path)
    if path.is_dir():
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            pickled = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _ALL_PICKLES)
            hint = (
                f" (found only pickled {', '.join(pickled)}; pickles are not looked for in a directory — "
                "pass a .pth/.pt file itself to read it)"
                if pickled
                else ""
            )
            raise WeightsError(f"{path}: no {WEIGHTS_FILE}{hint}")
        config = weights.parent / CONFIG_FILE
        if not config.is_file():
            raise WeightsError(f"{config}: missing (the checkpoint's configuration must lie beside its weights)")
        return "hf", weights, config
    if path.is_file():
        if suffix in _PTH_SUFFIXES:
            return "pth", path, None
        if suffix != ".safetensors":
            raise WeightsError(f"{path}: not a .safetensors, .pth or .pt file")
        config = path.parent / CONFIG_FILE
        return ("hf", path, config) if config.is_file() else ("alone", path, None)
    raise WeightsError(
        f"{str(path)!r} is neither a released model name ({', '.join(PRETRAINED_NAMES)}) nor an existing path "
        f"(a Hugging Face Hub repository is named {HF_PREFIX}owner/name)"
    )


def _download(
    what: str, repo_id: str, filenames: tuple[str, ...], revision: str | None, progress: bool
) -> list[Path]:
    """Files of a Hub repository, from huggingface_hub's cache (downloaded when not there)."""
    try:
        kwargs: dict[str, Any] = {"tqdm_class": None if progress else silent_tqdm}
        if revision is not None:
            kwargs["revision"] = revision
        return [Path(hf_hub_download(repo_id, name, **kwargs)) for name in filenames]
    # huggingface_hub reports trouble with many types (LocalEntryNotFoundError offline and
    # not cached, httpx errors, HfHubHTTPError, XetDownloadError, ...); each means the same here.
    except Exception as e:
        raise WeightsError(
            f"could not download {what} ({repo_id}) from the Hugging Face Hub (offline?) — "
            f"cached copies are used when present: {type(e).__name__}: {e}"
        ) from e


def hub_answers(name: str = "gpt2", timeout: float = 5.0) -> tuple[bool, str]:
    """Can the files of allowed name ``name`` be had now: (True, why) when huggingface_hub's cache holds
    them or the Hub answers a request for their metadata within ``timeout`` seconds, else (False, why).
    Downloads nothing; offline (``HF_HUB_OFFLINE=1``) only the cache counts."""
    info = pretrained_info(name)
    files = (CONFIG_FILE, WEIGHTS_FILE) if info.layout == "hf" else (info.filename,)
    if all(isinstance(try_to_load_from_cache(info.repo_id, f), str) for f in files):
        return True, "its files are in the local Hugging Face cache"
    try:
        get_hf_file_metadata(hf_hub_url(info.repo_id, files[-1]), timeout=timeout)
    except Exception as e:  # offline mode, no network, a timeout, an HTTP error: each means "not now"
        return False, f"the Hugging Face Hub did not answer ({type(e).__name__})"
    return True, "the Hugging Face Hub answered"


def _revision(path: Path) -> str | None:
    """The commit of a file in huggingface_hub's cache: ``…/snapshots/<commit>/<file>``."""
    return path.parent.name if path.parent.parent.name == "snapshots" else None


_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_REPO_ID = re.compile(rf"{_REPO_PART}/{_REPO_PART}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")


def _parse_hf(spec: str) -> tuple[str, str | None]:
    """``"hf:owner/name[@revision]"`` → (repo id, revision or None)."""
    repo_id, at, revision = spec.removeprefix(HF_PREFIX).partition("@")
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or repo_id.endswith((".", "-")):
        raise WeightsError(f"{spec!r}: not a Hugging Face Hub repository id; write {HF_PREFIX}owner/name[@revision]")
    if at and (not _REVISION.fullmatch(revision) or ".." in revision):
        raise WeightsError(f"{spec!r}: {revision!r} is not a revision (a branch, tag or commit hash)")
    return repo_id, revision or None


# --------------------------------------------------------------------------- loading


def load_pretrained(
    name_or_path: str | os.PathLike[str],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    *,
    n_heads: int | None = None,
) -> GPTModel:
    """A :class:`GPTModel` (eval mode) holding pretrained or saved weights, with ``model.weights_source``.

    ``name_or_path``:

    * a name of :data:`PRETRAINED_NAMES` (downloaded from the Hub with a ``progress`` bar;
      the ``book:`` names are the book companion's ``.pth`` files);
    * ``"hf:owner/name"`` or ``"hf:owner/name@revision"``: any Hub repository holding
      ``model.safetensors`` and ``config.json`` in GPT-2 layout (for operators; visitors only
      reach names that pass :func:`is_allowed_name`);
    * a local path: a directory with ``model.safetensors`` and ``config.json``; a
      ``.safetensors`` file (``config.json`` beside it is used when present, else the
      configuration comes from the tensors); a ``.pth`` / ``.pt`` state dict in the book's
      names (read with ``torch.load(weights_only=True)``). A string that is an allowed name
      always means the Hub model (a local folder called ``gpt2`` needs ``"./gpt2"`` or a
      ``Path``); any other string, ``"owner/name"`` included, is a path.

    ``n_heads``: the number of attention heads where the configuration comes from the tensors
    (default: the released GPT-2 of the same width, :data:`GPT2_HEADS`). ``device``: default
    :func:`~gptviz.settings.select_device`. ``dtype``: default float32; tensors are converted
    as they are read.

    Raises :class:`WeightsError` (unknown name, download failure, missing or refused file)
    or its subclass :class:`CheckpointError` (tensors or config that do not fit GPT-2, a
    pickle that asks for more than tensors), :class:`NeedsHeadsError` among them.
    """
    device = torch.device(device) if device is not None else select_device()
    dtype = dtype or torch.float32
    if isinstance(name_or_path, str) and is_allowed_name(name_or_path):
        info = pretrained_info(name_or_path)
        if info.layout == "book":
            (path,) = _download(name_or_path, info.repo_id, (info.filename,), None, progress)
            model = _load_pth(path, str(path), n_heads, device, dtype)
        else:
            config, path = _download(name_or_path, info.repo_id, (CONFIG_FILE, WEIGHTS_FILE), None, progress)
            model = _load_hf(path, config, str(path), n_heads, device, dtype)
        source = WeightsSource(kind=info.layout if info.layout == "book" else "hub", name=name_or_path,
                               repo_id=info.repo_id, revision=_revision(path), filename=info.filename,
                               config=model.cfg)  # fmt: skip
    elif isinstance(name_or_path, str) and name_or_path.startswith(HF_PREFIX) and not Path(name_or_path).exists():
        repo_id, revision = _parse_hf(name_or_path)
        config, path = _download(name_or_path, repo_id, (CONFIG_FILE, WEIGHTS_FILE), revision, progress)
        model = _load_hf(path, config, str(path), n_heads, device, dtype)
        source = WeightsSource(kind="hub", name=name_or_path, repo_id=repo_id, revision=_revision(path) or revision,
                               filename=WEIGHTS_FILE, config=model.cfg)  # fmt: skip
    else:
        path = Path(name_or_path)
        how, weights, config = _local(path)
        if how == "hf":
            model = _load_hf(weights, config, str(weights), n_heads, device, dtype)
        elif how == "alone":
            model = _load_safetensors_alone(weights, str(weights), n_heads, device, dtype, None)
        else:
            model = _load_pth(weights, str(weights), n_heads, device, dtype)
        source = WeightsSource(kind="file", name=path.name or path.resolve().name, filename=weights.name,
                               sha256=_sha256(weights), config=model.cfg)  # fmt: skip
    model.weights_source = source
    return model

