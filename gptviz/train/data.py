"""The book's chapter-5 data and losses, with its names: ``GPTDatasetV1`` and
``create_dataloader_v1`` (sliding windows, chapter 2), the character split (5.1.3), The Verdict,
``calc_loss_batch`` / ``calc_loss_loader`` (5.1.2), ``evaluate_model``, the losses before training and
the sample continuation after each epoch (5.2)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..generation.session import generate_greedy  # the app's greedy generation: its one import here
from ..model import GPTModel
from ..tokenizer import ENDOFTEXT, get_encoding

__all__ = ["GPTDatasetV1", "create_dataloader_v1", "split_text", "read_text", "calc_loss_batch", "calc_loss_loader",
           "evaluate_model", "initial_losses", "generate_sample", "VERDICT_PATH", "SEED"]

VERDICT_PATH = Path(__file__).resolve().parents[2] / "assets" / "the-verdict.txt"
VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
SEED = 123  # the book's torch.manual_seed(123)


# --------------------------------------------------------------------------- data (chapter 2, 5.1.3)
class GPTDatasetV1(Dataset):
    """Windows of ``max_length`` token ids, ``stride`` apart; each target is its input shifted by one."""

    def __init__(self, txt: str, tokenizer, max_length: int, stride: int) -> None:
        for name, value in (("max_length", max_length), ("stride", stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.input_ids, self.target_ids = [], []
        token_ids = tokenizer.encode(txt, allowed_special={ENDOFTEXT})
        if len(token_ids) <= max_length:
            n = len(token_ids)
            what = {0: "empty", 1: "a single token"}.get(n, f"{n} tokens long, shorter than one window")
            raise ValueError(f"the text is {what}: training needs at least max_length + 1 = {max_length + 1} "
                             "tokens (an input window and its targets, shifted by one)")  # fmt: skip
        for i in range(0, len(token_ids) - max_length, stride):
            input_chunk = token_ids[i : i + max_length]  # (max_length,)
            target_chunk = token_ids[i + 1 : i + max_length + 1]  # (max_length,): the next token of each
            self.input_ids.append(torch.tensor(input_chunk))
            self.target_ids.append(torch.tensor(target_chunk))

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[idx], self.target_ids[idx]


def create_dataloader_v1(txt: str, batch_size: int = 4, max_length: int = 256, stride: int = 128,
                         shuffle: bool = True, drop_last: bool = True, num_workers: int = 0) -> DataLoader:
    """The book's loader over :class:`GPTDatasetV1`, with gptviz's offline GPT-2 tokenizer."""
    tokenizer = get_encoding()
    dataset = GPTDatasetV1(txt, tokenizer, max_length, stride)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers)


def split_text(text: str, train_ratio: float = 0.90) -> tuple[str, str]:
    """The book's split by characters: the first ``train_ratio`` of ``text`` trains, the rest validates."""
    if not 0 < train_ratio < 1:
        raise ValueError(f"train_ratio must lie between 0 and 1, got {train_ratio!r}")
    split_idx = int(train_ratio * len(text))
    return text[:split_idx], text[split_idx:]


def read_text(path: str | Path | None = None) -> str:
    """The training text (default: The Verdict from ``assets/``, its sha256 checked)."""
    path = Path(path) if path is not None else VERDICT_PATH
    data = path.read_bytes()
    if path == VERDICT_PATH and hashlib.sha256(data).hexdigest() != VERDICT_SHA256:
        raise RuntimeError(f"{path} is not the book's the-verdict.txt (sha256 differs from {VERDICT_SHA256})")
    return data.decode("utf-8")


# --------------------------------------------------------------------------- losses (5.1.2, 5.1.3)
def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: GPTModel, device) -> torch.Tensor:
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)  # (b, T) each
    logits = model(input_batch)  # (b, T, vocab)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_batch.flatten())  # (b*T, vocab) vs (b*T,)


def calc_loss_loader(data_loader: DataLoader, model: GPTModel, device, num_batches: int | None = None) -> float:
    total_loss = 0.0
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total_loss / num_batches


def evaluate_model(model, train_loader, val_loader, device, eval_iter: int) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def initial_losses(model: GPTModel, train_loader: DataLoader, val_loader: DataLoader, device) -> tuple[float, float]:
    """The book's losses before training (5.1.3): eval mode, every batch, after ``manual_seed(123)``;
    the global random stream is left as it was, so training afterwards draws what the book's does."""
    device = torch.device(device)
    was_training = model.training
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(SEED)
        model.eval()
        with torch.no_grad():
            losses = calc_loss_loader(train_loader, model, device), calc_loss_loader(val_loader, model, device)
    model.train(was_training)
    return losses


def generate_sample(model: GPTModel, tokenizer, device, start_context: str, max_new_tokens: int = 50) -> str:
    """The book's ``generate_and_print_sample`` without the print: the text of 50 greedy tokens more."""
    was_training = model.training
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    encoded = torch.tensor(tokenizer.encode(start_context, allowed_special={ENDOFTEXT})).unsqueeze(0)  # (1, T)
    token_ids = generate_greedy(model, encoded.to(device), max_new_tokens, context_size)  # (1, T + 50)
    model.train(was_training)
    return tokenizer.decode(token_ids.squeeze(0).tolist()).replace("\n", " ")
