"""Sampling in the Generate view, through its handlers (no browser): temperature 0 is the source's
greedy loop, a seed repeats its draws, the candidates chart shows what the next step draws from
before it is taken, a sampled step says so, and calls without the sampling arguments (old API
clients) stay greedy; plus ``/step`` through ``gradio_client`` with and without those arguments."""

from __future__ import annotations

import gradio as gr
import pytest
import torch

from gptviz import GPTModel
from gptviz.settings import Settings
from gptviz.ui.generate import GenerateView, Main

from .conftest import assert_clear_top1, seeded, visit

PROMPT = "Hello, I am"
HELLO_IDS = [15496, 11, 314, 716]
SOLID, GREY = "#4C78A8", "#C7CCD6"  # gptviz.plots.generation.sampling_figure: may be drawn / cut off


@pytest.fixture
def view(ctx) -> GenerateView:
    return GenerateView(ctx)


def greedy_loop(model: GPTModel, ids: list[int], n: int) -> list[int]:
    """The source's generate_text_simple, uncached: crop, forward, last logits, softmax, argmax, append
    (each choice checked to be clear of the runner-up, so no kernel difference can flip it)."""
    idx = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            logits = model(idx[:, -model.cfg.context_length:])[:, -1, :]
            assert_clear_top1(logits)
            idx = torch.cat([idx, torch.argmax(torch.softmax(logits, dim=-1), dim=-1, keepdim=True)], dim=1)
    return idx[0].tolist()


def sampled_ids(view: GenerateView, who: str, n: int, **knobs) -> list[int]:
    """``n`` Steps of visitor ``who`` with the sampling sliders at ``knobs``; the session's ids."""
    args = dict(temperature=1.0, top_k=0, top_p=1, seed=123) | knobs
    out = None
    for _ in range(n):
        out = view.step(PROMPT, 0, 0, args["temperature"], args["top_k"], args["top_p"], args["seed"],
                        request=visit(who))
    return out.step_json["ids"]


def test_temperature_zero_is_the_source_greedy_loop(ctx, view, tiny_cfg):
    a = visit("a")
    for _ in range(6):
        out = view.step(PROMPT, 0, 0, 0, 0, 1, 7, request=a)  # T=0 with a seed: the seed is irrelevant
    assert out.step_json["ids"] == greedy_loop(seeded(tiny_cfg), HELLO_IDS, 6)
    assert not any(r.sampled for r in ctx.visitor(a).session.steps)
    last = out.step_json["last_step"]
    assert last["sampled"] is False and last["temperature"] == 0
    # temperature 0 ignores top-k and top-p too
    for _ in range(6):
        other = view.step(PROMPT, 0, 0, 0, 3, 0.2, 99, request=visit("b"))
    assert other.step_json["ids"] == out.step_json["ids"]


def test_same_seed_same_tokens_other_seed_other_tokens(view):
    first = sampled_ids(view, "a", 20, seed=42)
    again = sampled_ids(view, "b", 20, seed=42)
    other = sampled_ids(view, "c", 20, seed=43)
    assert first == again
    assert first[:4] == other[:4] == HELLO_IDS
    assert first[4:] != other[4:]  # 20 draws from a near-uniform tiny model: different seeds differ
    assert sum(x != y for x, y in zip(first[4:], other[4:])) >= 10


def test_same_seed_with_cut_offs_repeats_and_stays_inside_them(ctx, view):
    ids_a = sampled_ids(view, "a", 8, temperature=0.8, top_k=5, top_p=0.9, seed=5)
    assert sampled_ids(view, "b", 8, temperature=0.8, top_k=5, top_p=0.9, seed=5) == ids_a
    for r in ctx.visitor(visit("a")).session.steps:
        kept = [c.token_id for c in r.candidates if c.kept]
        assert r.sampled and r.token_id in kept and len(kept) == r.n_kept <= 5
        assert (r.temperature, r.sample_top_k, r.top_p, r.seed) == (0.8, 5, 0.9, 5)


def test_candidates_after_a_slider_move_show_the_kept_distribution(ctx, view):
    a = visit("a")
    view.step(PROMPT, 0, 0, request=a)
    fig = view.candidates(PROMPT, 1.0, 5, 1, 123, a)  # top_k=5 with the 10 (Settings.top_k) candidates shown
    assert isinstance(fig, type(view.step(PROMPT, 0, 0, request=visit("x")).topk))
    assert fig.layout.title.text.startswith("Next step (not taken yet)")
    assert "draws from 5 tokens" in fig.layout.title.text
    assert len(fig.data) == 2 and fig.data[1].name == "after temperature and cut-offs"
    softmax, solid = fig.data
    assert len(solid.x) == Settings().top_k == 10
    kept = [color != GREY for color in solid.marker.color]
    assert kept == [True] * 5 + [False] * 5
    assert sum(x for x, k in zip(solid.x, kept) if k) == pytest.approx(1.0, abs=1e-6)  # every kept one is in view
    assert all(x == 0 for x, k in zip(solid.x, kept) if not k)
    assert list(solid.text[5:]) == ["cut off"] * 5
    assert all(color == SOLID for color in solid.marker.color[:5])
    assert all(x > p for x, p in zip(solid.x[:5], softmax.x[:5]))  # renormalised over the kept five
    # no model work was taken yet: the session still has one step
    assert len(ctx.visitor(a).session.steps) == 1

    greedy = view.candidates(PROMPT, 0, 0, 1, 123, a)  # back to 0: the plain greedy chart
    assert "takes the most probable" in greedy.layout.title.text and len(greedy.data) == 1


def test_candidates_before_any_step_and_bad_values(view):
    a = visit("a")
    fig = view.candidates(PROMPT, 0.7, 0, 0.5, 1, a)  # a fresh session: the prompt is read
    assert fig.layout.title.text.startswith("Next step (not taken yet)")
    kept = [c != GREY for c in fig.data[1].marker.color]
    assert kept[0] and kept == sorted(kept, reverse=True)  # the nucleus is a prefix of the candidates
    for bad, message in [((-1, 0, 1, 1), "temperature"), ((1, -2, 1, 1), "top-k"), ((1, 0, 0, 1), "top-p"),
                         ((1, 0, 1, -5), "seed"), (("hot", 0, 1, 1), "numbers")]:
        with pytest.raises(gr.Error, match=message):
            view.candidates(PROMPT, *bad, a)


def test_a_sampled_step_is_recorded_as_sampled(ctx, view):
    a = visit("a")
    view.candidates(PROMPT, 1.0, 5, 1, 123, a)
    out = view.step(PROMPT, 0, 0, 1.0, 5, 1, 123, request=a)
    r = ctx.visitor(a).session.steps[-1]
    last = out.step_json["last_step"]
    assert last["sampled"] is True and last["temperature"] == 1.0 and last["top_k"] == 5 and last["seed"] == 123
    assert last["token_id"] == r.token_id in [c.token_id for c in r.candidates[:5]]
    assert "(sampled, T=1)" in out.topk.layout.title.text and out.topk.layout.title.text.startswith("Step 1:")
    assert "1 sampled (dashed)" in out.gen_text
    chosen = [c for c in out.topk.data[1].marker.color]
    assert chosen.count("#E45756") == 1  # the drawn token is highlighted among the kept


def test_old_calls_without_sampling_arguments_stay_greedy(ctx, view, tiny_cfg):
    a = visit("a")
    out = view.step(PROMPT, 0, 0, request=a)  # the pre-sampling signature
    assert isinstance(out, Main) and out.step_json["last_step"]["sampled"] is False
    view.step(PROMPT, 0, 0, 1.0, 0, 1, 9, request=a)  # one sampled step in between ...
    out = view.step(PROMPT, 1, 1, request=a)  # ... then an old call: greedy again (the defaults)
    s = ctx.visitor(a).session
    assert [r.sampled for r in s.steps] == [False, True, False]
    assert s.steps[-1].token_id == greedy_loop(seeded(tiny_cfg), s.ids[:-1], 1)[-1]
    outs = list(view.step_n(PROMPT, 2, 0, 0, request=a))  # Step ×N too
    assert len(outs) == 2 and not any(r.sampled for r in s.steps[-2:])


# --------------------------------------------------------------------------- through gradio_client


@pytest.fixture(scope="module")
def app():
    from gptviz.ui import running_app

    with running_app(Settings(device="cpu")) as demo:
        yield demo


def test_step_endpoint_with_and_without_sampling_arguments(app):
    from gradio_client import Client

    step_json = Main._fields.index("step_json")
    old, new = Client(app.local_url, verbose=False), Client(app.local_url, verbose=False)
    data = old.predict(PROMPT, 0, 0, api_name="/step")[step_json]  # only (prompt, layer, head): greedy
    assert data["steps"] == 1 and data["ids"][:4] == HELLO_IDS and data["last_step"]["sampled"] is False
    data = old.predict(PROMPT, 0, 0, api_name="/step")[step_json]
    view = GenerateView(app.gptviz)
    for _ in range(2):
        direct = view.step(PROMPT, 0, 0, request=visit("direct-greedy")).step_json
    assert data["ids"] == direct["ids"]

    knobs = (1.0, 20, 0.9, 7)  # temperature, top_k, top_p, seed
    for _ in range(3):
        data = new.predict(PROMPT, 0, 0, *knobs, api_name="/step")[step_json]
        direct = view.step(PROMPT, 0, 0, *knobs, request=visit("direct-sampled")).step_json
    assert data["last_step"]["sampled"] is True and data["last_step"]["seed"] == 7
    assert data["ids"] == direct["ids"] and len(data["ids"]) == 7
