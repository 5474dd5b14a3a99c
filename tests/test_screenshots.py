"""The screenshot maker: its command line, its shot list against the real page, and one
real shot in Debian's chromium (the whole set is made by `python -m gptviz.tools.screenshots`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from gptviz.files.shipped import shipped_config, shipped_figures
from gptviz.settings import SHIPPED, Settings
from gptviz.tools import screenshots
from gptviz.tools.screenshots import SHOTS, Shot, make_screenshots, parse_args
from gptviz.ui import build_demo

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def page_parts() -> tuple[set[str], set[str]]:
    """(every elem_id, every tab label) of the app's page, from the config the browser receives."""
    components = build_demo(Settings(device="cpu"), preload=False).get_config_file()["components"]
    return ({c["props"]["elem_id"] for c in components if c["props"].get("elem_id")},
            {c["props"]["label"] for c in components if c["type"] == "tabitem"})


def test_command_line():
    default = parse_args([])
    assert default.out == ROOT / "assets" / "screenshots" and default.scale == 1
    args = parse_args(["--out", "docs/pics", "--scale", "2"])
    assert args.out == Path("docs/pics") and args.scale == 2


def test_shots_cover_every_tab_and_the_views_the_readme_tours(page_parts):
    _, tabs = page_parts
    names = [s.name for s in SHOTS]
    assert len(set(names)) == len(names) and all(re.fullmatch(r"[a-z0-9-]+", n) for n in names)
    assert {s.tab for s in SHOTS} == tabs  # a new tab needs a shot
    assert {"tokenizer", "generate", "attention", "heads-grid", "logit-lens", "parameters", "parameters-custom",
            "model", "inside-shapes", "inside-ablation", "inside-precision", "inside-kv-cache"} <= set(names)


def test_the_shots_of_learned_behaviour_show_the_shipped_model():
    models = {s.name: s.model for s in SHOTS}
    learned = {"generate", "attention", "heads-grid", "logit-lens", "why", "head-roles", "sampling"}
    assert {models[n] for n in learned} == {SHIPPED}
    assert all(models[n] is None for n in ("tokenizer", "parameters", "parameters-table", "parameters-custom", "train"))
    assert set(models.values()) <= {None, *screenshots.MODEL_LABELS}
    cfg = shipped_config()  # the attention shots' head is one the shipped model has
    assert screenshots.LAYER < cfg.n_layers and screenshots.HEAD < cfg.n_heads
    best = shipped_figures()["atlas"]["verdict"]["best"]["previous_token"]
    assert (screenshots.LAYER, screenshots.HEAD) == (best["layer"], best["head"])


def test_every_element_a_shot_names_exists(page_parts):
    elem_ids, _ = page_parts
    for shot in SHOTS:
        text = " ".join([shot.frame, *shot.whole, *shot.ready, *(str(a) for action in shot.actions for a in action)])
        named = set(re.findall(r"#([A-Za-z][\w-]*)", text))
        assert named, shot.name
        assert named <= elem_ids | {"tabs"}, f"{shot.name}: no such element {named - elem_ids}"


def test_one_real_shot_and_a_loud_failure(tmp_path, monkeypatch):
    """The tokenizer shot is a 1280×800 PNG with real content; a shot whose element is not in
    the picture (a hidden tab's) stops the run with an error naming it."""
    if not Path(screenshots.CHROMIUM).exists():
        pytest.fail(f"chromium not found at {screenshots.CHROMIUM}: install Debian's chromium")
    for var in ("GPTVIZ_DEVICE", "HF_HUB_OFFLINE", "GRADIO_ANALYTICS_ENABLED"):  # restored after the test
        monkeypatch.setenv(var, "")
    monkeypatch.delenv("GPTVIZ_WEIGHTS", raising=False)
    bad = Shot("bad", "Tokenizer", whole=["#model-card"])
    with pytest.raises(RuntimeError, match="'bad': #model-card is not entirely in the picture"):
        make_screenshots(tmp_path, shots=[SHOTS[0], bad])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shots.json", f"{SHOTS[0].name}.png"]
    assert json.loads((tmp_path / "shots.json").read_text()) == {SHOTS[0].name: {"tab": "Tokenizer", "model": None}}
    image = Image.open(tmp_path / f"{SHOTS[0].name}.png")
    assert image.format == "PNG" and image.size == (1280, 800)
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 500  # text, chips, table: not a blank page
    assert (tmp_path / f"{SHOTS[0].name}.png").stat().st_size < 250_000
