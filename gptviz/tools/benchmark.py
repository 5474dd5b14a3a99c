"""Generation speed and memory: ``python -m gptviz.tools.benchmark [--quick] [--json]``.

For the gpt2 (124M) shape, random weights (seed 123), fp32, batch 1, torch threads = cores,
at contexts 16, 128, 512 and 1000, side by side in one run:

* **session**: :class:`~gptviz.generation.session.GenerationSession` steps with attention recording
  and top-k, with and without the logit lens. Prefill = the first step (it reads the whole
  prompt); decode = median ms per token over a ``step(n)`` (the KV cache is kept within it).
* **uncached**: the source's ``generate_text_simple`` loop (full recompute each token).
* **transformers**: ``GPT2LMHeadModel`` (random init from ``GPT2Config``, same shape, sdpa
  attention) ``generate``; decode ms per token = median gap between consecutive calls of a
  timestamping logits processor (one decode forward + generate's own bookkeeping each);
  prefill = a forward on the prompt (all logits, as a plain forward computes them; and with
  ``logits_to_keep=1``, as ``generate`` does). Measured in a fresh process per context, so
  neither library inherits the other's allocator state (on the development VM, generate's
  growing cache sometimes ran 8x slower after gptviz had run in the same process).

Also: peak RSS, the session's retained bytes, bf16 decode, and ``param_breakdown`` for
GPT-3 175B. Timings on a shared machine are noisy; the ratios come from the same run.

**Decode kernels** (always; contexts 16 and 512): one row per contender, measured round by
round in turns (so load on a shared machine hits them alike), p50 ms per token and the ratio
to transformers' float32 decode of the same rounds:

* gptviz session step (attention recorded, top-10) in float32, float16 and bfloat16;
* the same float32 step with one kernel forced for every product (``F.linear``, oneDNN's):
  what :func:`~gptviz.kernels.linear`'s per-shape choice (``auto``) gains on this CPU;
* the same step in float32 with the **book's layout and kernels** (every weight a contiguous
  (out, in) ``nn.Linear`` matrix of its own, so the three projections run unfused, and every
  product through ``F.linear``, :func:`~gptviz.kernels.book_kernels`): the speed-up of
  :func:`~gptviz.kernels.linear` and :meth:`~gptviz.model.GPTModel.optimize_layout_` as a
  same-run ratio;
* :func:`~gptviz.generation.session.generate_greedy` in float32 (ms between consecutive forward
  calls);
* transformers' ``generate`` in float32 (ms between consecutive logits-processor calls), the
  reference of every ratio.

transformers runs in one persistent child process that answers the parent's requests
(its own allocator, its own model), so its rounds interleave with gptviz's.
``--lens`` adds the logit lens product (n_layers residual rows against the head) per kernel
and dtype; ``--layouts`` the memory bandwidth of a one-row product per weight shape, kernel,
layout and dtype (what :func:`~gptviz.kernels.linear` and
:meth:`~gptviz.model.GPTModel.optimize_layout_` are based on).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import PRESETS, GPTConfig
from ..generation.session import GenerationSession, generate_greedy
from ..kernels import choose_kernels
from ..model import GPTModel
from ..tokenizer import get_encoding
from .benchmark_kernels import KERNEL_CONTEXTS, KERNEL_ROWS, Child, _child, build_model, decode_kernels, greedy_decode_ms, hf_decode_ms, hf_decode_round, hf_model, layout_bandwidth, lens_products, ms, peak_rss_mib, plain_layout, random_prompt, report_kernels, serve, uncached_step_ms

CONTEXTS = (16, 128, 512, 1000)
CONTENDERS = (("step", False), ("step_lens", True))  # session variants: without / with the logit lens


def hf_context(ctx: int, steps: int, rounds: int) -> dict[str, float]:
    """transformers at one context: median decode ms per token, forward ms (all logits / last only)."""
    model, prompt = hf_model(), random_prompt(ctx, seed=ctx)
    ids = torch.tensor([prompt])
    samples: dict[str, list[float]] = {"hf": [], "hf_fwd": [], "hf_fwd_last": []}
    with torch.no_grad():
        for _ in range(rounds):
            samples["hf"] += hf_decode_ms(model, prompt, steps)
            samples["hf_fwd"].append(ms(lambda: model(ids, use_cache=False)))
            samples["hf_fwd_last"].append(ms(lambda: model(ids, use_cache=False, logits_to_keep=1)))
    return {key: statistics.median(v) for key, v in samples.items()}


def session_context(model: GPTModel, ctx: int, steps: int, rounds: int, uncached_steps: int) -> dict[str, Any]:
    """The session (with and without the lens, interleaved round by round) and the uncached loop."""
    enc, prompt = get_encoding(), random_prompt(ctx, seed=ctx)
    samples: dict[str, list[float]] = {"step": [], "step_lens": [], "prefill": []}
    sessions = {key: GenerationSession(model, enc, prompt, logit_lens=lens) for key, lens in CONTENDERS}
    for session in sessions.values():
        session.step()  # prefill
    for _ in range(rounds):
        samples["prefill"].append(GenerationSession(model, enc, prompt).step()[0].ms)
        for key, session in sessions.items():
            records = session.step(steps)
            # Cached steps only: past 768 tokens the cache is over budget between actions and shrunk,
            # so the first step of each step(n) recomputes the positions past the kept prefix
            # (reported as a lone step).
            samples[key] += [r.ms for r in records if r.positions_computed == 1]
            for _ in records:
                session.undo()
    lone = sessions["step_lens"].step()[0]
    row: dict[str, Any] = {key: statistics.median(v) for key, v in samples.items()}
    row["uncached"] = uncached_step_ms(model, prompt, uncached_steps)
    row["lone_step"], row["lone_step_positions"] = lone.ms, lone.positions_computed
    row["retained_mb"] = sessions["step_lens"].retained_bytes / 1e6
    row["cache_kept"] = sessions["step_lens"].cache_tokens
    return row


def _status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (Linux), in MiB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def session_memory(ctx: int, steps: int) -> dict[str, float]:
    """RSS with the model alone, then the peak RSS over one session's prefill of ``ctx`` tokens and
    ``steps`` steps (the peak is reset after the model is built). Run it in a fresh process."""
    model = build_model()
    base = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM, the peak RSS
    session = GenerationSession(model, get_encoding(), random_prompt(ctx))
    session.step()
    session.step(steps)
    return {"model_rss_mib": base, "peak_rss_mib": _status_mib("VmHWM"), "retained_mb": session.retained_bytes / 1e6}


def params_ms() -> float | None:
    """``param_breakdown`` for GPT-3 175B (median ms), or None if gptviz.params is missing."""
    try:
        from ..params import param_breakdown
    except ImportError:
        return None
    cfg = GPTConfig(vocab_size=50257, context_length=2048, emb_dim=12288, n_heads=96, n_layers=96)
    param_breakdown(cfg)
    return ms(lambda: param_breakdown(cfg), repeat=20)


def run(quick: bool = False, lens: bool = False, layouts: bool = False, kernels_only: bool = False) -> dict[str, Any]:
    torch.set_num_threads(os.cpu_count() or 1)
    contexts, steps, rounds = ((16, 512), 6, 2) if quick else (CONTEXTS, 10, 3)
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "dtype": "float32", "contexts": {}}
    model = build_model()
    result["chosen_kernels"] = choose_kernels(model)  # before any timing: what linear() runs here
    hf = importlib.util.find_spec("transformers") is not None
    result["transformers"] = "GPT2LMHeadModel, sdpa attention, random init, own process" if hf else None
    child = Child() if hf else None
    try:
        result["kernels"] = decode_kernels(model, child, steps=8, rounds=5 if quick else 9)
    finally:
        if child is not None:
            child.close()
    if lens:
        result["lens_products_ms"] = lens_products()
    if layouts:
        result["layout_gb_s"] = layout_bandwidth()
    if kernels_only:
        return result
    for ctx in contexts:
        uncached_steps = 1 if quick else (4 if ctx <= 128 else 2)
        row = session_context(model, ctx, steps, rounds, uncached_steps)
        if hf:
            row.update(_child(f"b.hf_context({ctx}, {steps}, {rounds})"))
        result["contexts"][ctx] = row
    result["peak_rss_mib"] = peak_rss_mib()
    result["session_memory_1000"] = _child(f"b.session_memory(1000, {steps})")
    if not quick:
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        result["bf16_step_ms"] = {}
        for ctx in (16, 512):
            session = GenerationSession(bf16, get_encoding(), random_prompt(ctx, seed=ctx), logit_lens=False)
            session.step()
            result["bf16_step_ms"][ctx] = statistics.median(r.ms for r in session.step(steps))
        del bf16
    result["param_breakdown_175B_ms"] = params_ms()
    return result


def report(result: dict[str, Any]) -> str:
    ctxs = result["contexts"]
    hf = result["transformers"] is not None
    lines = [
        f"gptviz generation benchmark: gpt2 (124M) shape, random weights, {result['dtype']}, batch 1, "
        f"{result['threads']} threads",
        f"transformers: {result['transformers'] or 'not installed'}",
        "step = GenerationSession step with attention recording and top-10; +lens adds the logit lens",
        "",
        *report_kernels(result),
        "",
        f"{'context':>7} | {'decode ms/token':^34} | {'prefill ms (first step)':^29} | {'uncached':>8} | retained",
        f"{'':>7} | {'step':>7} {'+lens':>7} {'HF':>7} {'step/HF':>9} | {'step':>7} {'HF fwd':>7} {'HF last':>7} "
        f"{'/fwd':>5} | {'ms/token':>8} | {'MB':>8}",
    ]
    dash = f"{'-':>7}"
    for ctx, row in ctxs.items():
        lines.append(
            f"{ctx:>7} | {row['step']:7.1f} {row['step_lens']:7.1f} "
            + (f"{row['hf']:7.1f} {row['step'] / row['hf']:8.2f}x" if hf else f"{dash} {'-':>9}")
            + f" | {row['prefill']:7.0f} "
            + (
                f"{row['hf_fwd']:7.0f} {row['hf_fwd_last']:7.0f} {row['prefill'] / row['hf_fwd']:5.2f}"
                if hf
                else f"{dash} {dash} {'-':>5}"
            )
            + f" | {row['uncached']:8.0f} | {row['retained_mb']:8.1f}"
        )
    lines += ["", "ratios (same run):"]
    for ctx, row in ctxs.items():
        text = f"  ctx {ctx:>4}: uncached / step {row['uncached'] / row['step']:5.1f}x"
        if hf:
            text += (
                f"; step / HF decode {row['step'] / row['hf']:.2f}, (step+lens) / HF decode "
                f"{row['step_lens'] / row['hf']:.2f}; prefill / HF forward {row['prefill'] / row['hf_fwd']:.2f} "
                f"(/ HF forward with logits_to_keep=1: {row['prefill'] / row['hf_fwd_last']:.2f})"
            )
        lines.append(text)
    if 16 in ctxs and 1000 in ctxs:
        for key in ("step", "step_lens"):
            lines.append(f"  {key} at 1000 / at 16: {ctxs[1000][key] / ctxs[16][key]:.2f}")
    for ctx, row in ctxs.items():
        lines.append(
            f"  ctx {ctx:>4}: a lone step() after step(n): {row['lone_step']:.0f} ms, "
            f"{row['lone_step_positions']} position(s) computed; KV cache kept between actions: "
            f"{row['cache_kept']} positions"
        )
    mem = result["session_memory_1000"]
    lines += [
        "",
        f"peak RSS: {result['peak_rss_mib']:.0f} MiB (this process: the model, all contexts); a fresh process "
        f"with the model alone: {mem['model_rss_mib']:.0f} MiB, peak during a 1000-token session: "
        f"{mem['peak_rss_mib']:.0f} MiB, retained after it: {mem['retained_mb']:.1f} MB",
    ]
    if "bf16_step_ms" in result:
        bf = ", ".join(f"ctx {c}: {v:.1f} ms" for c, v in result["bf16_step_ms"].items())
        lines.append(f"bf16 step decode (attention + top-k, no lens): {bf}")
    p = result["param_breakdown_175B_ms"]
    lines.append("param_breakdown(GPT-3 175B): " + (f"{p:.2f} ms" if p is not None else "skipped (no gptviz.params)"))
    lines.append("note: wall times on a shared machine are noisy; compare ratios from the same run.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptviz.tools.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="contexts 16 and 512 only, fewer steps, no bf16")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--lens", action="store_true", help="also time the logit lens product per layout and dtype")
    parser.add_argument("--layouts", action="store_true", help="also measure GB/s per weight shape, layout and dtype")
    parser.add_argument("--kernels-only", action="store_true", help="only the decode kernel table (and --lens/--layouts)")
    parser.add_argument("--load", action="store_true",
                        help="start the app and run the classroom scenarios through gradio_client (gptviz.tools.loadtest)")
    parser.add_argument("--fair", action="store_true",
                        help="start the app and measure analyses and a training beside visitors who step without "
                             "pause (gptviz.tools.fairness)")
    parser.add_argument("--against", type=Path, default=None,
                        help="with --load or --fair: another checkout (e.g. `git worktree add ../before HEAD~1`) measured "
                             "in the same run, for ratios")
    parser.add_argument("--scenario", choices=["all", "builders"], default="all",
                        help="with --load: every classroom scenario, or only 4 visitors building ~1.9 GB models")
    parser.add_argument("--budget", type=float, default=4e9,
                        help="with --scenario builders: the app's GPTVIZ_MAX_TOTAL_BYTES (default 4e9)")
    args = parser.parse_args(argv)
    if args.load or args.fair:
        from . import fairness, loadtest

        if args.load:
            results = loadtest.main(args.against, quick=args.quick, scenario=args.scenario, budget=int(args.budget))
        else:
            results = fairness.main(args.against, quick=args.quick)
        if args.json:
            print(json.dumps(results, indent=2))
        return 0
    result = run(quick=args.quick, lens=args.lens, layouts=args.layouts, kernels_only=args.kernels_only)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(report_kernels(result)) if args.kernels_only else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
