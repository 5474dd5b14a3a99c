"""Generation speed and memory: ``python -m gptviz.benchmark [--quick] [--json]``.

For the gpt2 (124M) shape, random weights (seed 123), fp32, batch 1, torch threads = cores,
at contexts 16, 128, 512 and 1000, side by side in one run:

* **session**: :class:`~gptviz.generation.GenerationSession` steps with attention recording
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
* the same step in float32 with the **plain layout** (every weight a contiguous (out, in)
  ``nn.Linear`` matrix of its own, so the three projections run unfused): the speed-up of
  :meth:`~gptviz.model.GPTModel.optimize_layout_` as a same-run ratio;
* :func:`~gptviz.generation.generate_greedy` in float32 (ms between consecutive forward
  calls);
* transformers' ``generate`` in float32 (ms between consecutive logits-processor calls), the
  reference of every ratio.

transformers runs in one persistent child process that answers the parent's requests
(its own allocator, its own model), so its rounds interleave with gptviz's.
``--lens`` adds the logit lens product (n_layers − 1 residual rows against the head) in
each layout and dtype; ``--layouts`` the memory bandwidth of a one-row product per weight
shape, layout and dtype (what :meth:`~gptviz.model.GPTModel.optimize_layout_` is based on).
"""

from __future__ import annotations

import argparse
from pathlib import Path
import copy
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch

from .config import PRESETS, GPTConfig
from .generation import GenerationSession, generate_greedy
from .model import GPTModel
from .tokenizer import get_encoding

CONTEXTS = (16, 128, 512, 1000)
CONTENDERS = (("step", False), ("step_lens", True))  # session variants: without / with the logit lens


def build_model(dtype: torch.dtype = torch.float32) -> GPTModel:
    torch.manual_seed(123)
    return GPTModel(PRESETS["gpt2"]).to(dtype).eval()


def plain_layout(model: GPTModel) -> GPTModel:
    """A copy of ``model`` with every weight contiguous in a buffer of its own: ``nn.Linear``'s
    (out, in) layout, the three attention projections unfused (the book's model as built)."""
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for p in plain.parameters():
            p.data = p.detach().clone(memory_format=torch.contiguous_format)
    return plain


def random_prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 50257, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def ms(f: Callable[[], Any], repeat: int = 1) -> float:
    """Median wall time of ``f`` in milliseconds."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def uncached_step_ms(model: GPTModel, prompt: list[int], steps: int) -> float:
    """The source's generate_text_simple loop, uncached: median ms per token."""
    idx, ctx, times = torch.tensor([prompt]), model.cfg.context_length, []
    for _ in range(steps):
        t0 = time.perf_counter()
        idx_cond = idx[:, -ctx:]
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]
        probas = torch.softmax(logits, dim=-1)
        idx_next = torch.argmax(probas, dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _child(expr: str) -> Any:
    """Evaluate ``expr`` (this module is ``b``) in a fresh Python process; return its JSON value."""
    code = (
        f"import json, torch; from gptviz import benchmark as b; torch.set_num_threads({torch.get_num_threads()}); "
        f"print(json.dumps({expr}))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def hf_model() -> Any:
    """transformers' GPT-2 of the same shape (random init)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257, attn_implementation="sdpa"
    )
    torch.manual_seed(123)
    return GPT2LMHeadModel(config).eval()


def hf_decode_ms(model: Any, prompt: list[int], steps: int) -> list[float]:
    """ms per decoded token of ``generate``: gaps between consecutive logits-processor calls."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return scores

    ids, stamp = torch.tensor([prompt]), Stamp()
    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=steps + 1,
            min_new_tokens=steps + 1,
            do_sample=False,
            logits_processor=LogitsProcessorList([stamp]),
            pad_token_id=0,
            eos_token_id=None,
        )
    return [(b - a) * 1e3 for a, b in zip(stamp.times, stamp.times[1:])]


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


# --------------------------------------------------------------------------- decode kernels, same run

KERNEL_CONTEXTS = (16, 512)
_HF: dict[str, Any] = {}  # the child's transformers model, built once


def hf_decode_round(ctx: int, steps: int) -> list[float]:
    """(child side) One round of transformers' float32 decode at ``ctx``: ms per token."""
    if "model" not in _HF:
        _HF["model"] = hf_model()
    return hf_decode_ms(_HF["model"], random_prompt(ctx, seed=ctx), steps)


def serve() -> None:
    """(child side) Evaluate one expression per stdin line (this module is ``b``); answer one JSON line each."""
    env = {"b": sys.modules[__name__]}
    for line in sys.stdin:
        print(json.dumps(eval(line, env)), flush=True)  # noqa: S307 - the parent's own expressions


class Child:
    """A persistent Python process running :func:`serve`: ask it expressions, get JSON values."""

    def __init__(self) -> None:
        code = (
            f"import torch; from gptviz import benchmark as b; torch.set_num_threads({torch.get_num_threads()}); "
            "b.serve()"
        )
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def ask(self, expr: str) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(expr + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the transformers child process ended (exit code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def greedy_decode_ms(model: GPTModel, prompt: list[int], steps: int) -> list[float]:
    """ms per decoded token of ``generate_greedy``: gaps between consecutive forward calls
    (one cached forward + the greedy loop's own work each; the first call is the prefill)."""
    stamps: list[float] = []
    handle = model.register_forward_pre_hook(lambda module, args: stamps.append(time.perf_counter()))
    try:
        generate_greedy(model, torch.tensor([prompt]), steps + 2, model.cfg.context_length)
    finally:
        handle.remove()
    return [(b - a) * 1e3 for a, b in zip(stamps[1:], stamps[2:])]  # the gaps after the prefill: steps of them


#: Rows of the kernel table: (key, label). "hf" is transformers' float32 decode, the reference.
KERNEL_ROWS = (
    ("float32", "gptviz step, float32"),
    ("float16", "gptviz step, float16"),
    ("bfloat16", "gptviz step, bfloat16"),
    ("plain", "gptviz step, float32, plain layout"),
    ("greedy", "gptviz generate_greedy, float32"),
    ("hf", "transformers generate, float32"),
)


def decode_kernels(model: GPTModel, child: Child | None, steps: int, rounds: int) -> dict[int, dict[str, Any]]:
    """Every contender of :data:`KERNEL_ROWS` at each of :data:`KERNEL_CONTEXTS`, in turns round
    by round: p50 ms per token, and the spread of the per-round ratios to transformers."""
    enc = get_encoding()
    models = {
        "float32": model,
        "float16": copy.deepcopy(model).to(torch.float16),
        "bfloat16": copy.deepcopy(model).to(torch.bfloat16),
        "plain": plain_layout(model),
    }
    out: dict[int, dict[str, Any]] = {}
    for ctx in KERNEL_CONTEXTS:
        prompt = random_prompt(ctx, seed=ctx)
        sessions = {k: GenerationSession(m, enc, prompt, logit_lens=False) for k, m in models.items()}
        for session in sessions.values():
            session.step()  # prefill
        samples: dict[str, list[float]] = {key: [] for key, _ in KERNEL_ROWS}
        per_round: dict[str, list[float]] = {key: [] for key, _ in KERNEL_ROWS}
        for _ in range(rounds):
            got: dict[str, list[float]] = {}
            for key, session in sessions.items():
                records = session.step(steps)
                got[key] = [r.ms for r in records if r.positions_computed == 1]
                for _ in records:
                    session.undo()
            got["greedy"] = greedy_decode_ms(model, prompt, steps)
            if child is not None:
                got["hf"] = child.ask(f"b.hf_decode_round({ctx}, {steps})")
            for key, values in got.items():
                samples[key] += values
                per_round[key].append(statistics.median(values))
        row: dict[str, Any] = {key: statistics.median(v) for key, v in samples.items() if v}
        if child is not None:
            for key in list(row):
                ratios = [a / b for a, b in zip(per_round[key], per_round["hf"])]
                row[f"{key}_ratio_range"] = (min(ratios), max(ratios))
        row |= {f"{key}_min": min(v) for key, v in samples.items() if v}
        out[ctx] = row
    del models
    return out


def lens_products(repeat: int = 15) -> dict[str, float]:
    """The logit lens's product: 11 residual rows (n_layers − 1) against gpt2's 50257 × 768 head,
    median ms, as generation.py writes it and as F.linear, in the plain and the fast layouts
    and in float16."""
    torch.manual_seed(0)
    head = torch.randn(50257, 768) * 0.02  # (vocab, emb), nn.Linear's layout
    rows = torch.randn(11, 768)
    fast = head.t().contiguous().t()  # storage (emb, vocab): what optimize_layout_ gives in float32
    half, rows16 = head.half(), rows.half()
    cases = {
        "(W @ x.T).T, W (out, in) [generation.py now]": lambda: (head @ rows.T).T.contiguous(),
        "F.linear(x, W), W (out, in)": lambda: torch.nn.functional.linear(rows, head),
        "(W @ x.T).T, W (in, out) storage": lambda: (fast @ rows.T).T.contiguous(),
        "F.linear(x, W), W (in, out) storage": lambda: torch.nn.functional.linear(rows, fast),
        "F.linear(x16, W16), float16 copy (out, in)": lambda: torch.nn.functional.linear(rows16, half).float(),
        "(W16 @ x16.T).T, float16 copy (out, in)": lambda: (half @ rows16.T).T.float(),
    }
    return {name: ms(f, repeat) for name, f in cases.items()}


def layout_bandwidth(repeat: int = 5) -> list[dict[str, Any]]:
    """GB/s that a one-row product ``F.linear(x, W, b)`` reads its weight at, per gpt2 weight
    shape, dtype and storage layout; each over enough distinct matrices (>= 200 MB) that they
    stream from memory, not from the cache."""
    shapes = {"W_query|W_key|W_value": (768, 2304), "out_proj": (768, 768), "ff.layers.0": (768, 3072),
              "ff.layers.2": (3072, 768), "out_head": (768, 50257)}  # fmt: skip
    table = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for name, (d_in, d_out) in shapes.items():
            n = max(2, int(200e6 // (d_in * d_out * dtype.itemsize)))
            x, bias = torch.randn(1, 1, d_in, dtype=dtype), torch.randn(d_out, dtype=dtype)
            row: dict[str, Any] = {"weight": name, "shape (out, in)": (d_out, d_in), "dtype": str(dtype)[6:]}
            for layout in ("(out, in)", "(in, out)"):
                ws = [torch.randn(d_out, d_in, dtype=dtype) for _ in range(n)]
                if layout == "(in, out)":
                    ws = [w.t().contiguous().t() for w in ws]
                for w in ws:
                    torch.nn.functional.linear(x, w, bias)  # warm-up
                t = ms(lambda: [torch.nn.functional.linear(x, w, bias) for w in ws], repeat) / 1e3
                row[layout] = n * d_in * d_out * dtype.itemsize / t / 1e9
                del ws
            table.append(row)
    return table


def params_ms() -> float | None:
    """``param_breakdown`` for GPT-3 175B (median ms), or None if gptviz.params is missing."""
    try:
        from .params import param_breakdown
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


def report_kernels(result: dict[str, Any]) -> list[str]:
    kernels = result["kernels"]
    hf = result["transformers"] is not None
    lines = [
        "decode kernels, same run, in turns round by round (gpt2 shape: emb 768, 12 layers, tied head, qkv bias):",
        f"{'':<38} " + " | ".join(f"{f'ctx {c}: p50 ms':>14} {'/ HF':>6} {'(rounds)':>13} {'min ms':>7} {'/ HF':>6}" for c in kernels),
    ]
    for key, label in KERNEL_ROWS:
        cells = []
        for row in kernels.values():
            if key not in row:
                cells.append(f"{'-':>14} {'-':>6} {'':>13} {'-':>7} {'-':>6}")
                continue
            ratio = f"{row[key] / row['hf']:5.2f}x" if hf else f"{'-':>6}"
            lo, hi = row.get(f"{key}_ratio_range", (None, None))
            spread = f"({lo:.2f}-{hi:.2f})" if lo is not None else ""
            low = row.get(f"{key}_min")
            low_ratio = f"{low / row['hf_min']:5.2f}x" if hf and low is not None else f"{'-':>6}"
            cells.append(f"{row[key]:14.1f} {ratio:>6} {spread:>13} " + (f"{low:7.1f} {low_ratio:>6}" if low else f"{'-':>7} {'-':>6}"))
        lines.append(f"{label:<38} " + " | ".join(cells))
    for ctx, row in kernels.items():
        lines.append(
            f"  ctx {ctx:>4}: fast layout / plain layout (float32 step) {row['float32'] / row['plain']:.2f}; "
            f"float16 / float32 {row['float16'] / row['float32']:.2f}; bfloat16 / float32 {row['bfloat16'] / row['float32']:.2f}"
        )
    lines.append(
        "  (rounds) = lowest-highest ratio of the per-round medians: the noise of this run; min = the fastest token "
        "(what each runs at when nothing else wants the cores). generate_greedy and transformers generate: ms between "
        "consecutive forward / logits-processor calls."
    )
    if "lens_products_ms" in result:
        lines += ["", "logit lens product, 11 rows x gpt2 head (50257 x 768), median ms:"]
        lines += [f"  {name:<46} {v:7.2f}" for name, v in result["lens_products_ms"].items()]
    if "layout_gb_s" in result:
        lines += ["", "one-row product F.linear(x, W, b): GB/s read, by storage layout", f"  {'weight':<22} {'(out, in)':>10} {'dtype':>9} {'(out, in)':>10} {'(in, out)':>10}"]
        lines += [
            f"  {r['weight']:<22} {str(r['shape (out, in)']):>10} {r['dtype']:>9} {r['(out, in)']:10.1f} {r['(in, out)']:10.1f}"
            for r in result["layout_gb_s"]
        ]
    return lines


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
    parser = argparse.ArgumentParser(prog="python -m gptviz.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="contexts 16 and 512 only, fewer steps, no bf16")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--lens", action="store_true", help="also time the logit lens product per layout and dtype")
    parser.add_argument("--layouts", action="store_true", help="also measure GB/s per weight shape, layout and dtype")
    parser.add_argument("--kernels-only", action="store_true", help="only the decode kernel table (and --lens/--layouts)")
    parser.add_argument("--load", action="store_true",
                        help="start the app and run the classroom scenarios through gradio_client (gptviz.loadtest)")
    parser.add_argument("--against", type=Path, default=None,
                        help="with --load: another checkout (e.g. `git worktree add ../before HEAD~1`) measured "
                             "in the same run, for ratios")
    args = parser.parse_args(argv)
    if args.load:
        from . import loadtest

        results = loadtest.main(args.against, quick=args.quick)
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
