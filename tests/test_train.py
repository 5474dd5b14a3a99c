"""gptviz.train: the book's chapter-5 data, losses and loop, the step-wise Trainer, checkpoints."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from pathlib import Path

import pytest
import torch

from gptviz import GPTConfig, GPTModel, load_pretrained
from gptviz.analysis.autograd import gradient_check
from gptviz.train import (TRAIN_PRESETS, VERDICT_PATH, GPTDatasetV1, Trainer, TrainPreset, TrainStep, create_dataloader_v1,
                          initial_losses, read_text, save_checkpoint, setup, split_text, train_model_simple)  # fmt: skip

from . import book_model

pytestmark = pytest.mark.numeric  # .ci/run runs this file again on another CPU code path

SHARED_VERDICT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "the-verdict.txt"
VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
EVERY_EFFORT = [6109, 3626, 6100, 345]  # "Every effort moves you", as the book prints it

#: A small run for CI: 2 blocks, 64 wide, context 32, on the first 3,000 characters of The Verdict
#: (5 training batches of (4, 32), 1 validation batch).
SMALL = TrainPreset("small", GPTConfig(context_length=32, emb_dim=64, n_heads=2, n_layers=2, drop_rate=0.1),
                    lr=0.004, weight_decay=0.1, batch_size=4, max_length=32, stride=32, num_epochs=3,
                    eval_freq=2, eval_iter=2)  # fmt: skip


@pytest.fixture(scope="module")
def verdict() -> str:
    return read_text()


@pytest.fixture(scope="module")
def small(verdict):
    """(model, train_loader, val_loader) of SMALL, seeded as the book."""
    return setup(SMALL, verdict[:3000])


def small_trainer(small, **changes) -> Trainer:
    model, train_loader, val_loader = small
    p = dataclasses.replace(SMALL, **changes)
    torch.manual_seed(7)  # the trainer's random stream starts from here
    return Trainer(model, train_loader, val_loader, lr=p.lr, weight_decay=p.weight_decay, device="cpu",
                   num_epochs=p.num_epochs, eval_freq=p.eval_freq, eval_iter=p.eval_iter)  # fmt: skip


# --------------------------------------------------------------------------- data


class Counting:
    """A tokenizer whose text "n" encodes to the ids 0 … n-1 (windows are then easy to check by hand)."""

    def encode(self, txt, allowed_special=()):
        return list(range(int(txt))) if txt else []


def test_the_shipped_verdict_is_the_books_file():
    assert hashlib.sha256(VERDICT_PATH.read_bytes()).hexdigest() == VERDICT_SHA256
    if SHARED_VERDICT.is_file():
        assert VERDICT_PATH.read_bytes() == SHARED_VERDICT.read_bytes()


def test_windows_shift_by_one_and_step_by_the_stride():
    # 10 tokens, max_length 4, stride 2: starts range(0, 10 - 4, 2) = 0, 2, 4
    ds = GPTDatasetV1("10", Counting(), max_length=4, stride=2)
    assert len(ds) == 3
    assert [x.tolist() for x, _ in ds] == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7]]
    assert [y.tolist() for _, y in ds] == [[1, 2, 3, 4], [3, 4, 5, 6], [5, 6, 7, 8]]
    # stride = max_length: no overlap; 9 tokens: starts 0, 4 (token 8 is only ever a target)
    ds = GPTDatasetV1("9", Counting(), max_length=4, stride=4)
    assert [(x.tolist(), y.tolist()) for x, y in ds] == [([0, 1, 2, 3], [1, 2, 3, 4]), ([4, 5, 6, 7], [5, 6, 7, 8])]
    # exactly max_length + 1 tokens: one window
    assert len(GPTDatasetV1("5", Counting(), max_length=4, stride=1)) == 1


def test_windows_of_real_text(enc):
    ds = GPTDatasetV1("Every effort moves you", enc, max_length=2, stride=1)
    assert [(x.tolist(), y.tolist()) for x, y in ds] == [(EVERY_EFFORT[0:2], EVERY_EFFORT[1:3]),
                                                         (EVERY_EFFORT[1:3], EVERY_EFFORT[2:4])]  # fmt: skip


def test_the_books_split_and_loaders(verdict, enc):
    assert len(verdict) == 20_479 and len(enc.encode(verdict)) == 5_145
    train_data, val_data = split_text(verdict)
    assert (len(train_data), len(val_data)) == (18_431, 2_048) and train_data + val_data == verdict
    torch.manual_seed(123)
    train_loader = create_dataloader_v1(train_data, batch_size=2, max_length=256, stride=256)
    val_loader = create_dataloader_v1(val_data, batch_size=2, max_length=256, stride=256, shuffle=False,
                                      drop_last=False)  # fmt: skip
    # The book: 9 training batches of (2, 256) (4,608 tokens), 1 validation batch (512 tokens).
    assert (len(train_loader), len(val_loader)) == (9, 1)
    assert sum(x.numel() for x, _ in train_loader) == 4_608 and sum(x.numel() for x, _ in val_loader) == 512
    assert all(x.shape == y.shape == (2, 256) for x, y in train_loader)


@pytest.mark.parametrize("text, message", [
    ("", r"^the text is empty: training needs at least max_length \+ 1 = 5 tokens"),
    ("Hello", r"the text is a single token: training needs at least max_length \+ 1 = 5 tokens"),
    ("Every effort moves you", r"the text is 4 tokens long, shorter than one window: .*max_length \+ 1 = 5"),
])  # fmt: skip
def test_texts_too_short_to_train_on_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        create_dataloader_v1(text, batch_size=1, max_length=4, stride=4)


def test_a_validation_part_shorter_than_a_window_is_named(verdict):
    with pytest.raises(ValueError, match=r"the validation part of the text \(100 characters\): the text is 2\d tokens"):
        setup(SMALL, verdict[:1000])


@pytest.mark.parametrize("lr", [0, -0.001, float("nan"), float("inf"), "0.001", None, True])
def test_the_learning_rate_must_be_a_positive_number(small, lr):
    model, train_loader, val_loader = small
    with pytest.raises(ValueError, match=r"the learning rate must be a positive number, got "):
        Trainer(model, train_loader, val_loader, lr=lr, device="cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.param_groups[0]["lr"] = lr
    with pytest.raises(ValueError, match=r"the learning rate must be a positive number"):
        Trainer(model, train_loader, val_loader, optimizer=optimizer, device="cpu")


# --------------------------------------------------------------------------- the model's training path


def test_training_mode_drops_out_and_gradients_match_the_books_model(small):
    model, train_loader, _ = small
    x, y = next(iter(train_loader))  # (4, 32) each
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # dropout is on
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    theirs = book_model.GPTModel(model.cfg.to_dict())
    missing, unexpected = theirs.load_state_dict(model.state_dict(), strict=False)
    assert all(k.endswith(".att.mask") for k in missing) and not unexpected
    theirs.eval()
    ours = GPTModel(model.cfg)
    ours.load_state_dict(model.state_dict())
    ours.eval()
    for m in (ours, theirs):
        torch.nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten()).backward()
    grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():  # every parameter gets its gradient, the book model's
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-6, rtol=1e-4)


def test_autograd_agrees_with_finite_differences(small):
    model, train_loader, _ = small
    x, y = next(iter(train_loader))
    batch = (x[:2], y[:2])  # (2, 32) each
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [
        ("tok_emb.weight", (int(x[0, 3]), 5)), ("pos_emb.weight", (7, 1)),
        ("trf_blocks.0.att.W_query.weight", (3, 10)), ("trf_blocks.0.att.W_key.weight", (20, 4)),
        ("trf_blocks.1.att.W_value.weight", (0, 0)), ("trf_blocks.0.att.out_proj.bias", (9,)),
        ("trf_blocks.1.ff.layers.0.weight", (100, 3)), ("trf_blocks.1.ff.layers.2.bias", (2,)),
        ("trf_blocks.0.norm1.scale", (11,)), ("trf_blocks.1.norm2.shift", (12,)),
        ("final_norm.scale", (0,)), ("out_head.weight", (int(y[0, 0]), 6)),
    ]  # fmt: skip
    results = gradient_check(model, batch, params, eps=1e-6)
    assert len(results) == len(params)
    for r in results:
        assert abs(r.autograd) > 1e-6, r  # a derivative worth checking
        # float64, central difference: truncation ~eps² and rounding ~1e-16 * loss / eps ~ 1e-9
        assert abs(r.autograd - r.numeric) <= 1e-8 + 1e-6 * abs(r.autograd), r
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched


# --------------------------------------------------------------------------- the loop


def test_the_books_initial_losses(verdict):
    model, train_loader, val_loader = setup(TRAIN_PRESETS["book-ch05"], verdict)  # 124M, context 256
    train_loss, val_loss = initial_losses(model, train_loader, val_loader, "cpu")
    assert train_loss == pytest.approx(10.98758347829183, abs=1e-4)
    assert val_loss == pytest.approx(10.98110580444336, abs=1e-4)


def test_the_small_run_halves_its_loss(small):
    model, train_loader, val_loader = small
    start, _ = initial_losses(model, train_loader, val_loader, "cpu")
    trainer = small_trainer(small, num_epochs=6, eval_freq=4)
    records = list(trainer.run())
    assert len(records) == trainer.total_steps == 6 * len(train_loader) and trainer.done
    assert trainer.train_losses[-1] < start / 2, (start, trainer.train_losses)
    assert [r.step for r in records] == list(range(len(records)))
    assert sum(r.sample is not None for r in records) == 6  # one per epoch
    r = records[-1]
    assert r.tokens_seen == len(records) * SMALL.batch_size * 32 and r.lr == SMALL.lr and r.tokens_per_s > 0
    assert len(r.grad_norms) == 2 and all(n > 0 and math.isfinite(n) for n in r.grad_norms)


def test_stop_and_resume_gives_the_uninterrupted_run(small):
    whole = small_trainer(small)
    uninterrupted = list(whole.run())
    parts = small_trainer(small)
    resumed = list(parts.run(max_steps=3))  # stop mid-epoch
    torch.rand(100)  # the global generator moves on meanwhile
    for r in parts.run():
        resumed.append(r)
        if r.step == 6:
            parts.stop()  # from the consumer: after this step
    assert len(resumed) == 7 and not parts.done
    resumed += list(parts.run())
    strip = [(r.step, r.epoch, r.batch, r.tokens_seen, r.loss, r.train_loss, r.val_loss, r.sample, r.grad_norms)
             for r in uninterrupted]  # fmt: skip
    assert [(r.step, r.epoch, r.batch, r.tokens_seen, r.loss, r.train_loss, r.val_loss, r.sample, r.grad_norms)
            for r in resumed] == strip  # fmt: skip
    assert (parts.train_losses, parts.val_losses) == (whole.train_losses, whole.val_losses)
    for (name, a), b in zip(whole.model.state_dict().items(), parts.model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(RuntimeError, match="training is finished"):
        parts.step()


def test_training_never_changes_the_model_it_starts_from(small):
    model, _, _ = small
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = small_trainer(small, num_epochs=1)
    list(trainer.run())
    assert trainer.model is not model and not model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(trainer.model.out_head.weight, model.out_head.weight)  # the copy did learn


def test_train_model_simple_prints_the_books_lines(small, capsys):
    model, train_loader, val_loader = small
    torch.manual_seed(123)
    mine = GPTModel(model.cfg)
    optimizer = torch.optim.AdamW(mine.parameters(), lr=0.0004, weight_decay=0.1)
    train_losses, val_losses, tokens_seen = train_model_simple(mine, train_loader, val_loader, optimizer, "cpu",
                                                               num_epochs=2, eval_freq=2, eval_iter=1,
                                                               start_context="Every effort moves you",
                                                               tokenizer=None)  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    n = len(train_loader)  # steps per epoch
    evals = [s for s in range(2 * n) if s % 2 == 0]
    assert len(train_losses) == len(val_losses) == len(tokens_seen) == len(evals)
    assert tokens_seen == [(s + 1) * SMALL.batch_size * 32 for s in evals]
    expected = [f"Ep {s // n + 1} (Step {s:06d}): Train loss {t:.3f}, Val loss {v:.3f}"
                for s, t, v in zip(evals, train_losses, val_losses)]  # fmt: skip
    assert [line for line in lines if line.startswith("Ep ")] == expected
    samples = [line for line in lines if not line.startswith("Ep ")]
    assert len(samples) == 2 and all(s.startswith("Every effort moves you") for s in samples)
    assert mine.training  # trained in place, left in train mode as the book's loop leaves it


# --------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_loads_in_gptviz_and_in_the_books_model(small, tmp_path):
    trainer = small_trainer(small, num_epochs=1)
    list(trainer.run())
    path = tmp_path / "model_and_optimizer.pth"
    save_checkpoint(path, trainer.model, trainer.optimizer)
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"model_state_dict", "optimizer_state_dict"} and saved["optimizer_state_dict"]["state"]
    x = next(iter(small[1]))[0]  # (4, 32)
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(x)
        loaded = load_pretrained(path, device="cpu", n_heads=SMALL.cfg.n_heads)
        assert loaded.cfg == SMALL.cfg.replace(drop_rate=loaded.cfg.drop_rate)
        torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=0)
        theirs = book_model.GPTModel(SMALL.cfg.to_dict())
        missing, unexpected = theirs.load_state_dict(saved["model_state_dict"], strict=False)
        assert all(k.endswith(".att.mask") for k in missing) and not unexpected
        torch.testing.assert_close(theirs.eval()(x), expected, atol=1e-5, rtol=0)
    optimizer = torch.optim.AdamW(trainer.model.parameters())
    optimizer.load_state_dict(saved["optimizer_state_dict"])  # the book resumes training from it (5.4)
    assert optimizer.param_groups[0]["lr"] == SMALL.lr


def test_the_command_line_prints_the_books_lines_and_writes_a_checkpoint(monkeypatch, tmp_path, capsys):
    from gptviz import train

    monkeypatch.setitem(train.TRAIN_PRESETS, "small", dataclasses.replace(SMALL, num_epochs=5))
    text = tmp_path / "story.txt"
    text.write_text(read_text()[:3000], encoding="utf-8")
    out = tmp_path / "small.pth"
    argv = ["--preset", "small", "--epochs", "1", "--text", str(text), "--out", str(out), "--device", "cpu"]
    assert train.main(argv) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert re.fullmatch(r"Training loss: 11\.\d{14}", lines[0])
    assert re.fullmatch(r"Validation loss: 1\d\.\d{14}", lines[1])
    assert re.fullmatch(r"Ep 1 \(Step 000000\): Train loss \d+\.\d{3}, Val loss \d+\.\d{3}", lines[2])
    assert lines[-2].startswith("Training completed in ") and lines[-1] == f"Saved {out}"
    assert "step 5/5 ep 1" in captured.err  # the progress line (one per step when stderr is not a terminal)
    assert load_pretrained(out, device="cpu", n_heads=SMALL.cfg.n_heads).cfg.emb_dim == SMALL.cfg.emb_dim
    with pytest.raises(SystemExit):
        train.main(["--preset", "small", "--epochs", "0"])
    assert "--epochs must be a positive integer, got 0" in capsys.readouterr().err


# --------------------------------------------------------------------------- a step in slices (the app's turns)


def _run_in_slices(trainer: Trainer, rows: int | None, between=lambda: None) -> tuple[list, int]:
    """Every step through step_in_slices, ``between()`` run at each pause; (records, pauses)."""
    records, pauses = [], 0
    while not trainer.done:
        slices = trainer.step_in_slices(rows)
        while True:
            try:
                next(slices)
            except StopIteration as finished:
                records.append(finished.value)
                break
            pauses += 1
            between()
    return records, pauses


def _same_numbers(a: TrainStep, b: TrainStep) -> bool:
    return (a.loss, a.train_loss, a.val_loss, a.grad_norms, a.sample) == (b.loss, b.train_loss, b.val_loss,
                                                                           b.grad_norms, b.sample)


def test_whole_batch_slices_are_step_exactly_whatever_runs_between_them(small):
    """rows=None: the same kernels on the same batches, so exact equality; other visitors' work
    between the slices (random draws, dropout of another model) changes nothing."""
    plain = small_trainer(small, num_epochs=2)
    expected = list(plain.run())
    sliced = small_trainer(small, num_epochs=2)
    other = GPTModel(SMALL.cfg).train()

    def another_visitor():
        torch.rand(1000)
        other(torch.randint(0, 100, (1, 8)))  # dropout draws from the global stream

    records, pauses = _run_in_slices(sliced, None, another_visitor)
    assert len(records) == len(expected) and all(_same_numbers(a, b) for a, b in zip(records, expected))
    assert all(torch.equal(p, q) for p, q in zip(plain.model.parameters(), sliced.model.parameters()))
    evals = sum(r.evaluated for r in expected)
    per_eval = sum(min(SMALL.eval_iter, len(loader)) for loader in small[1:])
    assert pauses == len(expected) + evals * per_eval + 2  # a batch, each eval batch, 2 samples


def test_row_slices_add_up_to_the_whole_batchs_gradient(small):
    """rows=1 with dropout off: the chunks' weighted gradients equal the whole batch's mean-loss
    gradient up to float32 rounding of a 4-term sum (stated: 1e-4 relative, plus 1e-6 of the
    tensor's largest gradient for entries near 0), and the step's loss the batch's loss to 1e-6.
    (The gradients, not the weights: AdamW's first update is ~lr × sign(g), so a rounding-size
    difference in a near-zero gradient moves a weight by up to lr.)"""
    whole, sliced = (small_trainer(small, num_epochs=1) for _ in range(2))
    for t in (whole, sliced):
        t.model.eval()  # dropout off: one fixed function of the weights
        t.model.train = lambda mode=True, m=t.model: m  # the trainer's model.train() keeps it in eval
    a = next(whole.run(max_steps=1))
    slices = sliced.step_in_slices(rows=1)
    pauses = 0
    try:
        while True:
            next(slices)
            pauses += 1
    except StopIteration as finished:
        b = finished.value
    assert pauses >= SMALL.batch_size  # a pause after each of the batch's rows
    assert b.loss == pytest.approx(a.loss, abs=1e-6) and b.val_loss == pytest.approx(a.val_loss, abs=1e-6)
    for p, q in zip(whole.model.parameters(), sliced.model.parameters()):  # .grad: left by the step
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6 * float(p.grad.abs().max()) + 1e-9, rtol=1e-4)


def test_a_slice_reads_at_most_its_rows(small, monkeypatch):
    from gptviz.train import loop

    seen = []
    real = loop.calc_loss_batch
    monkeypatch.setattr(loop, "calc_loss_batch", lambda x, y, m, d: seen.append(x.shape[0]) or real(x, y, m, d))
    trainer = small_trainer(small, num_epochs=1)
    _run_in_slices(trainer, 3)
    assert seen and max(seen) <= 3 and 1 in seen  # batches of 4: chunks of 3 and 1
