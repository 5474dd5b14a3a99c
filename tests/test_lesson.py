"""Lesson files: export → save → load → replay, divergence reports, and refusal of bad uploads."""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptviz import GenerationSession, GPTModel
from gptviz.files.lesson import MAX_LESSON_BYTES, MAX_LESSON_TOKENS, LessonError, custom_source, hub_source, lesson_from_session, lesson_to_json, load_lesson, model_for_lesson, random_source, replay, save_lesson
from gptviz.tokenizer import token_piece

PROMPT = "Hello, I am"
VIEWS = {"tab": "generate", "layer": 1, "head": 2, "step": 6}


@pytest.fixture(scope="module")
def greedy_session(tiny_model, enc):
    s = GenerationSession(tiny_model, enc, PROMPT)
    s.step(6)
    return s


@pytest.fixture(scope="module")
def lesson(greedy_session, tiny_cfg):
    return lesson_from_session(greedy_session, model_source=random_source(tiny_cfg, 123), dtype="float32",
                               views=VIEWS, title="Chapter 4: greedy decoding")


@pytest.fixture(scope="module")
def other_model(tiny_cfg):
    """The tiny configuration with other weights (seed 7 instead of 123)."""
    torch.manual_seed(7)
    return GPTModel(tiny_cfg).eval()


def own_ids(model, enc, prompt, n, **kw) -> list[int]:
    """What `model` generates by itself: a fresh session stepped n times."""
    s = GenerationSession(model, enc, prompt, **kw)
    s.step(n)
    return s.generated_ids


# --------------------------------------------------------------------------- replay


def test_lesson_records_the_session(lesson, greedy_session, tiny_cfg, enc):
    assert lesson["prompt_ids"] == enc.encode(PROMPT)
    assert lesson["prompt_text"] == PROMPT
    assert lesson["generated_ids"] == greedy_session.generated_ids and len(lesson["generated_ids"]) == 6
    assert lesson["model"] == {"kind": "random", "seed": 123, "config": tiny_cfg.to_dict()}
    assert lesson["dtype"] == "float32"
    assert lesson["views"] == VIEWS
    assert lesson["sampling"]["temperature"] == 0.0 and lesson["sampling"]["seed"] == 123
    json.dumps(lesson, allow_nan=False)  # plain JSON data


def test_replay_on_the_same_model_gives_identical_ids(lesson, tiny_model, greedy_session):
    result = replay(lesson, tiny_model)
    assert result.ok and result.diverged_at is None and result.expected is None and result.got is None
    assert result.matched_steps == 6
    assert result.session.ids == greedy_session.ids
    assert len(result.session.steps) == 6 and result.notes == []
    assert "identical" in result.message


def test_replay_on_other_weights_reports_the_first_divergence(lesson, other_model, enc):
    theirs = own_ids(other_model, enc, lesson["prompt_ids"], 6)
    ours = lesson["generated_ids"]
    first = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    assert first is not None, "pick another seed: the two models agree on all 6 tokens"

    result = replay(lesson, other_model)
    assert not result.ok
    assert result.diverged_at == first and result.matched_steps == first
    assert result.expected.id == ours[first] and result.expected.piece == token_piece(ours[first], enc).text
    assert result.got.id == theirs[first] and result.got.piece == token_piece(theirs[first], enc).text
    # The session stops at the divergence: matched steps plus the one that differed.
    assert result.session.generated_ids == theirs[: first + 1]
    assert f"step {first + 1}" in result.message


def test_replay_diverging_later_stops_there(tiny_model, other_model, enc, tiny_cfg):
    """A lesson whose first tokens agree with the other model: the divergence is reported
    after them, not at the start (the lesson is made by hand from the other model's own ids)."""
    theirs = own_ids(other_model, enc, PROMPT, 3)
    wrong = next(i for i in range(100, 200) if i != own_ids(other_model, enc, enc.encode(PROMPT) + theirs, 1)[0])
    lesson = lesson_from_session(GenerationSession(tiny_model, enc, PROMPT), model_source=random_source(tiny_cfg),
                                 dtype="float32")
    lesson["generated_ids"] = theirs + [wrong, 5, 6]
    result = replay(lesson, other_model)
    assert result.diverged_at == 3 and result.matched_steps == 3
    assert result.expected.id == wrong and result.got.id != wrong
    assert result.session.generated_ids[:3] == theirs


def test_model_for_lesson_rebuilds_the_seeded_weights(lesson, tiny_model):
    state = torch.get_rng_state()
    model = model_for_lesson(lesson)
    assert torch.equal(torch.get_rng_state(), state), "building the model must not move the global RNG"
    assert not model.training and model.dtype == torch.float32
    for (name, a), (_, b) in zip(model.state_dict().items(), tiny_model.state_dict().items()):
        assert torch.equal(a, b), name
    assert replay(lesson).ok  # model=None: built from the lesson


def test_model_for_lesson_refuses_named_and_custom_weights(lesson, tiny_cfg):
    for source in (hub_source("gpt2", tiny_cfg), custom_source("my fine-tune", tiny_cfg)):
        other = dict(lesson, model=source)
        assert load_lesson(other)["model"]["kind"] == source["kind"]
        with pytest.raises(LessonError, match="random weights only"):
            model_for_lesson(other)


def test_round_trip_through_a_file(lesson, tiny_model, tmp_path, greedy_session):
    path = save_lesson(lesson, tmp_path / "lesson.json")
    text = path.read_text(encoding="utf-8")
    assert len(text.encode()) < 4_000  # a small file
    loaded = load_lesson(path)
    assert loaded == lesson
    assert load_lesson(text) == lesson and load_lesson(text.encode()) == lesson
    result = replay(path, tiny_model)
    assert result.ok and result.session.ids == greedy_session.ids


def test_sampling_settings_round_trip(tiny_model, enc, tiny_cfg, tmp_path):
    s = GenerationSession(tiny_model, enc, PROMPT, temperature=1.5, sample_top_k=50, seed=2024)
    s.step(8)
    assert all(r.sampled for r in s.steps)
    greedy = own_ids(tiny_model, enc, PROMPT, 8)
    assert s.generated_ids != greedy, "sampling should leave the greedy path for this check to mean anything"
    lesson = load_lesson(save_lesson(lesson_from_session(s, model_source=random_source(tiny_cfg), dtype="float32"),
                                     tmp_path / "sampled.json"))
    assert lesson["sampling"]["temperature"] == 1.5
    assert lesson["sampling"]["sample_top_k"] == 50 and lesson["sampling"]["seed"] == 2024
    result = replay(lesson, tiny_model)
    assert result.ok and result.session.generated_ids == s.generated_ids
    assert result.session.temperature == 1.5 and result.session.seed == 2024

    changed = copy.deepcopy(lesson)
    changed["sampling"]["seed"] = 2025  # another seed draws other tokens: the replay must notice
    other = own_ids(tiny_model, enc, PROMPT, 8, temperature=1.5, sample_top_k=50, seed=2025)
    first = next(k for k, (a, b) in enumerate(zip(s.generated_ids, other)) if a != b)
    assert replay(changed, tiny_model).diverged_at == first


def test_top_p_round_trips_when_the_session_has_it(tiny_model, enc, tiny_cfg):
    if "top_p" not in inspect.signature(GenerationSession).parameters:
        pytest.skip("this GenerationSession has no top_p")
    s = GenerationSession(tiny_model, enc, PROMPT, temperature=2.0, top_p=0.5, seed=11)
    s.step(6)
    lesson = load_lesson(lesson_to_json(lesson_from_session(s, model_source=random_source(tiny_cfg), dtype="float32")))
    assert lesson["sampling"]["top_p"] == 0.5
    result = replay(lesson, tiny_model)
    assert result.ok and result.session.generated_ids == s.generated_ids and result.session.top_p == 0.5
    without = copy.deepcopy(lesson)
    without["sampling"]["top_p"] = None
    theirs = own_ids(tiny_model, enc, PROMPT, 6, temperature=2.0, seed=11)
    first = next((k for k, (a, b) in enumerate(zip(s.generated_ids, theirs)) if a != b), None)
    assert replay(without, tiny_model).diverged_at == first


def test_sampling_changed_between_steps_replays(tiny_model, enc, tiny_cfg):
    if not hasattr(GenerationSession, "set_sampling"):
        pytest.skip("this GenerationSession cannot change sampling between steps")
    s = GenerationSession(tiny_model, enc, PROMPT)
    s.step(2)  # greedy
    s.set_sampling(temperature=1.5, seed=99)
    s.step(3)  # sampled
    s.set_sampling(temperature=0.0)
    s.step(1)  # greedy again
    s.set_sampling(temperature=0.7, sample_top_k=20)  # what the teacher left for the next step
    lesson = load_lesson(lesson_to_json(lesson_from_session(s, model_source=random_source(tiny_cfg), dtype="float32")))
    assert lesson["sampling"]["temperature"] == 0.0
    assert [c["step"] for c in lesson["sampling_changes"]] == [2, 5, 6]
    assert lesson["sampling_changes"][0]["temperature"] == 1.5 and lesson["sampling_changes"][0]["seed"] == 99
    result = replay(lesson, tiny_model)
    assert result.ok and result.session.generated_ids == s.generated_ids
    assert [r.sampled for r in result.session.steps] == [False, False, True, True, True, False]
    assert result.session.temperature == 0.7 and result.session.sample_top_k == 20
    # Without the changes, the replay is greedy throughout and must leave the lesson where sampling began.
    greedy = own_ids(tiny_model, enc, PROMPT, 6)
    first = next(k for k, (a, b) in enumerate(zip(s.generated_ids, greedy)) if a != b)
    assert first >= 2 and replay(dict(lesson, sampling_changes=[]), tiny_model).diverged_at == first


@pytest.mark.parametrize("changes, message", [
    ([{"temperature": 1.0}], "step.*missing"),
    ([{"step": 9, "temperature": 1.0}], "between 0 and 6"),
    ([{"step": 3, "seed": 1}, {"step": 3, "seed": 2}], "between 4 and 6"),
    ([{"step": 1}], "changes nothing"),
    ([{"step": 1, "stop_at_eos": True}], "whole session"),
    ([{"step": 1, "temperature": -2}], "temperature"),
    ("often", "must be a list"),
])
def test_bad_sampling_changes_are_refused(lesson, changes, message):
    with pytest.raises(LessonError, match=message):
        load_lesson(dict(lesson, sampling_changes=changes))


def test_long_prompt_text_is_shortened_but_ids_are_kept(tiny_model, enc, tiny_cfg):
    long_token = max(range(50256), key=lambda i: len(enc.decode_single_token_bytes(i)))
    ids = [long_token] * 400  # its text is over the 20,000 characters a lesson allows
    assert len(enc.decode(ids)) > 20_000
    s = GenerationSession(tiny_model, enc, ids)
    lesson = lesson_from_session(s, model_source=random_source(tiny_cfg), dtype="float32")
    assert lesson["prompt_ids"] == ids and len(lesson["prompt_text"]) == 20_000
    assert replay(lesson, tiny_model).session.prompt_ids == ids


def test_replay_notes_another_dtype(lesson, tiny_model):
    other = dict(lesson, dtype="bfloat16")
    result = replay(other, tiny_model)
    assert any("bfloat16" in n for n in result.notes)


def test_export_checks_the_source_config(greedy_session, tiny_cfg):
    with pytest.raises(LessonError, match="configuration"):
        lesson_from_session(greedy_session, model_source=random_source(tiny_cfg.replace(n_layers=3)),
                            dtype="float32")
    filled = lesson_from_session(greedy_session, model_source={"kind": "hub", "name": "gpt2"}, dtype="float32")
    assert filled["model"]["config"] == tiny_cfg.to_dict()


def test_replay_takes_only_display_options(lesson, tiny_model):
    result = replay(lesson, tiny_model, top_k=3, logit_lens=False)
    assert result.ok and len(result.session.steps[0].candidates) == 3 and result.session.steps[0].lens == []
    with pytest.raises(TypeError):
        replay(lesson, tiny_model, temperature=1.0)  # sampling comes from the lesson, not the caller


# --------------------------------------------------------------------------- refusing bad lessons


def mangled(lesson, path, value):
    out = copy.deepcopy(lesson)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


@pytest.mark.parametrize("path, value, message", [
    (("version",), 2, "version"),
    (("version",), "1", "version"),
    (("version",), True, "version"),
    (("format",), "something-else", "not a gptviz lesson"),
    (("prompt_ids",), [15496, 50257], r"prompt_ids\[1\].*outside the vocabulary"),
    (("generated_ids",), [-1], "outside the vocabulary"),
    (("generated_ids",), [1] * MAX_LESSON_TOKENS, f"at most {MAX_LESSON_TOKENS}"),
    (("prompt_ids",), [1] * (MAX_LESSON_TOKENS + 1), "ids"),
    (("prompt_ids",), [], "prompt_ids"),
    (("prompt_ids",), "15496 11", "list of token ids"),
    (("prompt_ids",), [15496, 1.0], "integer"),
    (("prompt_ids",), [15496, True], "integer"),
    (("dtype",), "float64", "dtype"),
    (("dtype",), None, "dtype"),
    (("sampling", "temperature"), -1, "temperature"),
    (("sampling", "temperature"), "hot", "temperature"),
    (("sampling", "seed"), 2**70, "seed"),
    (("sampling", "max_retained_bytes"), None, "option of the app"),
    (("sampling",), [], "sampling"),
    (("model", "kind"), "path", "kind"),
    (("model", "name"), "/etc/passwd", "unknown key"),
    (("model", "config"), {"vocab_size": 50257}, "missing configuration"),
    (("model", "config", "n_layers"), 10**6, "GB"),
    (("model", "seed"), "123", "integer"),
    (("views", "layer"), 2, "views.layer"),
    (("views", "head"), -1, "views.head"),
    (("views", "tab"), ["generate"], "string"),
    (("views",), "generate", "views"),
    (("title",), "x" * 10_000, "characters"),
    (("prompt_text",), 12, "string"),
    (("extra",), 1, "unknown key"),
])
def test_bad_lessons_are_refused_with_a_specific_error(lesson, path, value, message):
    bad = mangled(lesson, path, value)
    with pytest.raises(LessonError, match=message):
        load_lesson(bad)
    with pytest.raises(LessonError, match=message):  # the same through JSON text
        load_lesson(json.dumps(bad))
    assert issubclass(LessonError, ValueError)


def test_hub_names_must_be_released_models(lesson, tiny_cfg):
    for name in ("../../etc", "openai-community/gpt2", "gpt3", 7):
        with pytest.raises(LessonError, match="model.name"):
            load_lesson(dict(lesson, model={"kind": "hub", "name": name, "config": tiny_cfg.to_dict()}))


@pytest.mark.parametrize("text, message", [
    ("", "not a JSON object"),
    ("/etc/passwd", "pass a pathlib.Path"),  # a str is never read as a path
    ("[1, 2]", "not a JSON object"),
    ('{"format": "gptviz-lesson", "version": NaN}', "NaN"),
    ('{"version": 1, "version": 1}', "twice"),
    ("{" * 100_000, "nested too deeply|not valid JSON"),
    ('{"a": ' + "9" * 10_000 + "}", "not valid JSON"),
    ('{"a": "\\ud800"}', "not a gptviz lesson"),
    ("{" + " " * MAX_LESSON_BYTES + "}", "at most"),
])
def test_bad_text_is_refused(text, message):
    with pytest.raises(LessonError, match=message):
        load_lesson(text)


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(LessonError, match="cannot be read"):
        load_lesson(tmp_path / "missing.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(LessonError, match="UTF-8"):
        load_lesson(tmp_path / "bin.json")
    (tmp_path / "big.json").write_bytes(b"{" + b" " * (2 * MAX_LESSON_BYTES) + b"}")
    with pytest.raises(LessonError, match="at most"):
        load_lesson(tmp_path / "big.json")
    with pytest.raises(LessonError):
        load_lesson(12)


def test_lone_surrogates_are_refused(lesson):
    with pytest.raises(LessonError, match="surrogate"):
        load_lesson(json.dumps(dict(lesson, prompt_text="a\ud800b")))


def test_unknown_sampling_settings_need_a_session_that_takes_them(lesson, tiny_model):
    neutral = mangled(lesson, ("sampling", "future_knob"), None)
    assert replay(neutral, tiny_model).ok  # null is the neutral default: skipped
    active = mangled(lesson, ("sampling", "future_knob"), 0.5)
    load_lesson(active)  # readable …
    with pytest.raises(LessonError, match="future_knob"):
        replay(active, tiny_model)  # … but not replayable by this session


# Hypothesis: a lesson mangled anywhere is either still a valid lesson or refused with LessonError.

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mangled_lessons_never_raise_anything_else(lesson, tiny_cfg, data):
    bad = copy.deepcopy(lesson)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(bad) if p]
        path = data.draw(st.sampled_from(paths))
        parent = bad
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[data.draw(st.text(max_size=12))] = data.draw(JSON_VALUES)
        else:
            parent[path[-1]] = data.draw(JSON_VALUES)
        if not isinstance(bad, dict):
            break
    as_text = data.draw(st.booleans())
    try:
        source = json.dumps(bad) if as_text else bad
    except (ValueError, TypeError):
        source = bad
    try:
        got = load_lesson(source)
    except LessonError:
        return
    # Accepted: it must still be a lesson within every limit.
    vocab = got["model"]["config"]["vocab_size"]
    ids = got["prompt_ids"] + got["generated_ids"]
    assert got["version"] == 1 and 1 <= len(got["prompt_ids"]) and len(ids) <= MAX_LESSON_TOKENS
    assert all(type(i) is int and 0 <= i < vocab for i in ids)
    assert load_lesson(lesson_to_json(got)) == got


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200),
                 st.text(max_size=100).map(lambda s: "{" + s)))
def test_arbitrary_text_never_raises_anything_else(text):
    with pytest.raises(LessonError):
        load_lesson(text)


def test_lesson_from_the_app_flow_is_loadable_as_upload(lesson, tmp_path):
    """The app saves a lesson for download and later reads an upload: a Path in, a dict out."""
    path = save_lesson(lesson, tmp_path / "x.json")
    assert isinstance(load_lesson(Path(str(path))), dict)
