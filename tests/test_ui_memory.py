"""One memory budget for all visitors (gptviz.ui.memory), with a small budget and small models:
a build that would pass it makes room (idle visitors' models first, the longest idle first) or is
refused with a message saying what is in use and the limit; a released visitor is told and goes on
with the start-up model; everyone else keeps working with the same tokens; the count includes
sessions' caches, precision copies and trainings."""

from __future__ import annotations

import threading
import warnings

import gradio as gr
import psutil
import pytest
import torch

from gptviz import GPTConfig
from gptviz.config import CONFIG_FIELDS
from gptviz.files.weights import estimated_bytes
from gptviz.settings import RANDOM, Settings, machine_bytes
from gptviz.ui.generate import GenerateView
from gptviz.ui.memory import MemoryFull
from gptviz.ui.model import ModelView
from gptviz.ui.serving import AppContext, ModelSpec, ModelStore
from gptviz.ui.train import PARAMETERS, VERDICT, TrainView

from .conftest import seeded, source_greedy, visit

PROMPT = "Hello, I am"
HELLO_IDS = [15496, 11, 314, 716]
#: The start-up model and two visitors' own configurations: small, of sizes near each other.
BASE = GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
MINE = BASE.replace(n_layers=3)
THEIRS = BASE.replace(n_layers=4)


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers (each tensor once), counted here by hand."""
    seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


def budget(limit: int, **settings) -> AppContext:
    """An app with its own model store, ``limit`` bytes for everything and no app overhead
    counted (``base = 0``: the test process is not the app); a visitor is idle as soon as its
    event ends (``idle_s = 0``); no reads ahead (a worker holding a visitor's lock for a moment
    would make it look busy)."""
    ctx = AppContext(Settings(device="cpu", max_total_bytes=limit, read_ahead=False, **settings),
                     default_spec=ModelSpec(RANDOM, BASE))
    ctx.memory.base, ctx.memory.idle_s = 0, 0
    return ctx


def size(cfg: GPTConfig) -> int:
    return estimated_bytes(cfg, torch.float32)


def room_for_one_more() -> int:
    """The start-up model and one of MINE or THEIRS fit, with room for a few sessions; not both."""
    return size(BASE) + size(THEIRS) + size(MINE) // 2


def build(ctx: AppContext, cfg: GPTConfig, who: str):
    return ModelView(ctx).build_custom(*[getattr(cfg, f) for f in CONFIG_FIELDS], "float32", request=visit(who))


def step(ctx: AppContext, who: str) -> tuple[dict, list[str]]:
    """One Step of visitor ``who``: (its step data, the warnings it was given)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = GenerateView(ctx).step(PROMPT, 0, 0, request=visit(who)).step_json
    return data, [str(w.message) for w in caught]


def test_a_build_makes_room_by_releasing_the_longest_idle_visitors_model():
    ctx = budget(room_for_one_more())
    default = ModelSpec(RANDOM, BASE).label
    for _ in range(3):
        step(ctx, "stays")  # on the start-up model all along
    build(ctx, MINE, "a")
    assert step(ctx, "a")[0]["model"] == ModelSpec(RANDOM, MINE).label
    a = ctx.visitor(visit("a"))

    build(ctx, THEIRS, "b")  # MINE and THEIRS do not fit together: a, idle, is released
    assert a.spec.source == RANDOM and a.spec.cfg == BASE and a.own is None and ctx.memory.released == 1
    assert ModelSpec(RANDOM, MINE) not in ctx.models
    assert ctx.memory.in_use() <= ctx.memory.limit

    data, told = step(ctx, "a")  # told at its next action, and it goes on with the start-up model
    assert any("released while you were idle" in w and "other visitors needed the server's memory" in w
               and "random weights" in w for w in told)
    assert data["model"] == default and data["ids"] == source_greedy(seeded(BASE), HELLO_IDS, 1)
    assert not any("released" in w for w in step(ctx, "a")[1])  # told once

    stays, told = step(ctx, "stays")  # not released: its session and tokens go on unchanged
    assert stays["model"] == default and stays["ids"] == source_greedy(seeded(BASE), HELLO_IDS, 4) and not told
    theirs, told = step(ctx, "b")
    assert theirs["model"] == ModelSpec(RANDOM, THEIRS).label and not told
    assert theirs["ids"] == source_greedy(seeded(THEIRS), HELLO_IDS, 1)
    assert ctx.memory.in_use() <= ctx.memory.limit


def test_a_build_that_finds_no_room_is_refused_with_what_is_in_use_and_the_limit():
    ctx = budget(room_for_one_more())
    step(ctx, "warm")  # the start-up model is built
    build(ctx, MINE, "a")
    before = step(ctx, "a")[0]
    a, b = ctx.visitor(visit("a")), ctx.visitor(visit("b"))
    with a.lock:  # a's event is running: a is not idle, so nothing can be released
        with pytest.raises(MemoryFull) as refused:
            build(ctx, THEIRS, "b")
    message = refused.value.message
    assert message.startswith(f"Not enough server memory for {ModelSpec(RANDOM, THEIRS).label}: it needs "
                              f"{size(THEIRS) / 1e9:.2f} GB")
    assert f"of the {ctx.memory.limit / 1e9:.2f} GB this app may use for all its visitors (GPTVIZ_MAX_TOTAL_BYTES)" in message
    assert f"{ctx.memory.in_use() / 1e9:.2f} GB of the" in message and "active now" in message
    assert isinstance(refused.value, gr.Error)  # the visitor sees the message; the app goes on
    assert b.spec == ctx.default_spec and ModelSpec(RANDOM, THEIRS) not in ctx.models  # nothing half-made stays
    after = step(ctx, "a")[0]  # the busy visitor kept its model and session
    assert after["model"] == before["model"] and after["ids"][:-1] == before["ids"] and after["steps"] == 2
    build(ctx, THEIRS, "b")  # a idle now: room is made
    assert a.spec == ctx.default_spec


def test_a_visitor_active_within_the_idle_time_is_not_released_and_nobody_is_for_a_refusal():
    ctx = budget(room_for_one_more())
    ctx.memory.idle_s = 3600
    step(ctx, "warm")
    build(ctx, MINE, "a")
    step(ctx, "a")
    with pytest.raises(MemoryFull, match="active now"):
        build(ctx, THEIRS, "b")
    assert ctx.visitors.get("a").spec == ModelSpec(RANDOM, MINE) and ctx.memory.released == 0
    warm = ctx.visitors.get("warm")
    assert warm.session is not None and not warm.released  # no session was dropped for a refusal either
    ctx.memory.idle_s = 0  # an hour later
    build(ctx, THEIRS, "b")
    assert ctx.visitors.get("a").spec == ctx.default_spec and ctx.memory.released == 1


def test_visitors_sharing_a_model_are_released_together_or_not_at_all():
    ctx = budget(room_for_one_more())
    step(ctx, "warm")
    for who in ("a", "b"):
        build(ctx, MINE, who)  # one shared model: built once
        step(ctx, who)
    a, b = ctx.visitors.get("a"), ctx.visitors.get("b")
    with b.lock:  # b busy on it: releasing a alone would free nothing, so a keeps it
        with pytest.raises(MemoryFull):
            build(ctx, THEIRS, "c")
    assert a.spec == b.spec == ModelSpec(RANDOM, MINE) and ctx.memory.released == 0
    build(ctx, THEIRS, "c")  # both idle: both go, and so does the model
    assert a.spec == b.spec == ctx.default_spec and ctx.memory.released == 2
    assert ModelSpec(RANDOM, MINE) not in ctx.models


def test_a_model_larger_than_the_whole_budget_is_refused_as_such():
    ctx = budget(size(BASE) + size(MINE))
    ctx.memory.base = size(MINE)  # the app itself leaves no room for THEIRS
    with pytest.raises(MemoryFull, match="more than this server allows beside the app itself"):
        build(ctx, THEIRS, "a")


def test_switching_lets_the_visitors_own_previous_model_make_room():
    ctx = budget(room_for_one_more())
    step(ctx, "warm")
    build(ctx, MINE, "a")
    step(ctx, "a")
    build(ctx, THEIRS, "a")  # its own MINE goes: nobody else is released
    assert ctx.memory.released == 0 and ModelSpec(RANDOM, MINE) not in ctx.models
    assert step(ctx, "a")[0]["model"] == ModelSpec(RANDOM, THEIRS).label


def test_the_count_includes_models_sessions_precision_copies_and_trainings():
    ctx = budget(10**10)
    usage = ctx.memory.usage()
    assert usage["models"] == usage["sessions"] == usage["trainings"] == usage["making"] == 0
    for _ in range(3):
        step(ctx, "a")
    v = ctx.visitor(visit("a"))
    model = v.session.model
    usage = ctx.memory.usage()
    assert usage["models"] == tensor_bytes(model)  # the start-up model, once, though the session holds it too
    kv = 2 * BASE.n_layers * v.session.cache.length * BASE.emb_dim * 4  # the cached keys and values, float32
    assert usage["sessions"] >= kv > 0

    low = ctx.low_precision(v, torch.bfloat16)
    assert ctx.memory.usage()["models"] == tensor_bytes(model) + tensor_bytes(low)

    view = TrainView(ctx)
    items = view.start(VERDICT, "", None, PARAMETERS, 1, 0.004, 8, 32, 32, *[getattr(BASE, f) for f in CONFIG_FIELDS],
                       request=visit("t"))
    next(items)  # the first optimizer step
    run = ctx.visitor(visit("t")).training
    weights = sum(p.numel() * 4 for p in run.trainer.model.parameters())
    assert ctx.memory.usage()["trainings"] >= 4 * weights  # weights, gradients, AdamW's two moments
    view.pause(visit("t"))
    list(items)
    usage = ctx.memory.usage()
    assert usage["total"] == sum(usage[k] for k in ("app", "models", "sessions", "trainings", "making"))


def test_the_app_itself_is_what_the_process_holds_beyond_the_count():
    ctx = AppContext(Settings(device="cpu"), default_spec=ModelSpec(RANDOM, BASE))
    step_data = step(ctx, "a")[0]
    assert step_data["steps"] == 1
    elsewhere = torch.ones(32 * 2**20)  # 128 MB the app holds that no count sees (a request, a figure …)
    rss = psutil.Process().memory_info().rss
    usage = ctx.memory.usage()
    # never below the process's RSS (16 MB: what the process may hand back between the two readings)
    assert usage["total"] >= rss - 16 * 2**20
    assert usage["app"] > elsewhere.nbytes
    assert usage["models"] >= tensor_bytes(ctx.visitors.get("a").session.model)


def test_an_idle_visitors_stopped_training_is_released_but_a_running_one_is_not():
    ctx = budget(10**10)
    view, fields = TrainView(ctx), [getattr(BASE, f) for f in CONFIG_FIELDS]
    paused = view.start(VERDICT, "", None, PARAMETERS, 1, 0.004, 8, 32, 32, *fields, request=visit("p"))
    next(paused)
    view.pause(visit("p"))
    list(paused)
    running = view.start(VERDICT, "", None, PARAMETERS, 1, 0.004, 8, 32, 32, *fields, request=visit("r"))
    next(running)  # active: it has not finished
    trainings = ctx.memory.usage()["trainings"]
    ctx.memory.limit = ctx.memory.in_use() + size(MINE) - trainings // 4  # room once one training goes
    build(ctx, MINE, "b")
    p, r = ctx.visitors.get("p"), ctx.visitors.get("r")  # (not an action: nothing said yet)
    assert p.training is None and r.training is not None and ctx.memory.released == 1
    assert any(w.startswith("Your stopped training (the Parameters tab's configuration on The Verdict) was released")
               and "press Start on the Train tab" in w for w in step(ctx, "p")[1])
    view.stop(visit("r"))
    list(running)


def test_an_upload_that_finds_no_room_is_refused_and_deleted(tmp_path):
    ctx = budget(size(BASE) + size(MINE) // 2)
    path = tmp_path / "model.pth"
    torch.save(seeded(MINE).state_dict(), path)
    with pytest.raises(MemoryFull, match="Not enough server memory for your file model.pth"):
        ModelView(ctx).upload(str(path), 4, "float32", visit("a"), progress=lambda *a, **k: None)
    assert not path.exists() and ctx.visitor(visit("a")).spec == ctx.default_spec


def test_builds_at_once_never_pass_the_budget_together():
    ctx = budget(room_for_one_more())
    step(ctx, "warm")  # the start-up model is built
    peak, results, start = [0], {}, threading.Barrier(2)
    build_model = ctx.models.build

    def watched(spec):
        model = build_model(spec)
        peak[0] = max(peak[0], ctx.memory.in_use())  # while the other may be building too
        return model

    ctx.models.build = watched

    def builder(who, cfg):
        start.wait()
        try:
            results[who] = build(ctx, cfg, who) and "built"
        except MemoryFull:
            results[who] = "refused"

    threads = [threading.Thread(target=builder, args=a) for a in (("a", MINE), ("b", THEIRS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "built" in results.values() and peak[0] <= ctx.memory.limit and ctx.memory.in_use() <= ctx.memory.limit


def test_a_dropped_model_a_session_holds_is_handed_out_again_not_built_twice():
    built = []
    store = ModelStore(lambda spec: built.append(spec) or seeded(spec.cfg), capacity=1)
    held = store.get(ModelSpec(RANDOM, MINE))  # as a session holds it
    store.get(ModelSpec(RANDOM, THEIRS))  # the store drops MINE
    assert ModelSpec(RANDOM, MINE) not in store
    assert store.get(ModelSpec(RANDOM, MINE)) is held and len(built) == 2
    del held
    store.get(ModelSpec(RANDOM, THEIRS))
    store.drop(keep=set())
    assert store.built() == {}


def test_the_budget_is_read_from_the_environment_and_defaults_to_60_percent_of_the_machine(tmp_path, monkeypatch):
    assert Settings.from_env({"GPTVIZ_MAX_TOTAL_BYTES": "4e9"}).max_total_bytes == 4_000_000_000
    assert Settings.from_env({}).max_total_bytes == int(0.6 * min(machine_bytes(), psutil.virtual_memory().total))
    limit = tmp_path / "memory.max"
    limit.write_text("16000000000\n")  # a Space's container: 16 GB on a larger host
    monkeypatch.setattr("gptviz.settings.CGROUP_LIMITS", (str(tmp_path / "absent"), str(limit)))
    assert machine_bytes() == min(16_000_000_000, psutil.virtual_memory().total)
    limit.write_text("max\n")
    assert machine_bytes() == psutil.virtual_memory().total
    with pytest.raises(ValueError, match="GPTVIZ_MAX_TOTAL_BYTES must be a positive number"):
        Settings(max_total_bytes=0)
