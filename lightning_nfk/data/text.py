"""A byte-level text corpus as a LightningDataModule, for small language models on a CPU.

Documents come from plain-text files, split at separator lines (``%`` by default: the
fortune files of the Debian package ``fortunes``, ``apt-get install fortunes``, which
lie under ``/usr/share/games/fortunes``); each is encoded as UTF-8 bytes (256 token
ids, no tokenizer to download), cut to ``context`` tokens and right-padded. Items are
Hugging Face style dicts ``{"input_ids", "attention_mask"}``; the NFK callbacks and the
engine read them (:func:`lightning_nfk.kernel.pack_tokens`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_nfk.data.image_datamodule import EpochSeededSampler

FORTUNES = "/usr/share/games/fortunes"
PAD = 0  # byte 0 does not occur in text


class TokenDataset(Dataset):
    """Fixed-length token rows and their masks: items ``{"input_ids", "attention_mask"}``."""

    def __init__(self, ids: Tensor, mask: Tensor) -> None:
        self.ids, self.mask = ids, mask

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}

    def fingerprint(self) -> str:
        """A hash of the tokens (the run fingerprint's data part)."""
        h = hashlib.sha256(self.ids.numpy().tobytes())
        h.update(self.mask.numpy().tobytes())
        return h.hexdigest()[:16]


def read_documents(paths: list[Path], separator: str) -> list[bytes]:
    """The documents of the files, in file order: text between separator lines, stripped,
    UTF-8 encoded; empty ones dropped."""
    docs: list[bytes] = []
    for path in paths:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        current: list[str] = []
        for line in [*lines, separator]:
            if line.strip() == separator:
                text = "\n".join(current).strip()
                if text:
                    docs.append(text.encode("utf-8"))
                current = []
            else:
                current.append(line)
    return docs


def _text_files(source: str | os.PathLike[str] | list[str]) -> list[Path]:
    """The files of ``source``: a file, a list of files, or a folder's plain files
    (sorted; the fortune index files ``*.dat`` and links skipped)."""
    items = [Path(p) for p in (source if isinstance(source, list) else [source])]
    files: list[Path] = []
    for p in items:
        if p.is_dir():
            files += sorted(
                f for f in p.iterdir() if f.is_file() and not f.is_symlink() and f.suffix == ""
            )
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(
                f"`files`: {str(p)!r} does not exist"
                + (
                    " (the fortunes corpus: `apt-get install fortunes`)."
                    if str(p).startswith(FORTUNES)
                    else "."
                )
            )
    if not files:
        raise FileNotFoundError(f"`files`: no text files in {[str(p) for p in items]}.")
    return files


class TextDataModule(pl.LightningDataModule):
    """Byte-level documents of plain-text files, ``context`` tokens each (cut, then
    right-padded with a mask), split into train and validation by a seeded permutation.

    Args:
        files: a text file, a folder of them, or a list (default: the ``fortunes`` corpus).
        context: tokens per row (documents longer are cut).
        separator: the line that separates documents (``"%"`` in fortune files); None:
            every non-empty line is a document.
        min_tokens: shorter documents are dropped (at least 2: a sequence energy scores
            the tokens after the first).
        val_fraction: share of the documents held out for validation.
        max_documents: keep this many (after the seeded shuffle), e.g. for tests.
        batch_size, num_workers: the loaders'.
        seed: the split and the training loader's shuffling.
    """

    def __init__(
        self,
        files: str | list[str] = FORTUNES,
        context: int = 64,
        separator: str | None = "%",
        min_tokens: int = 8,
        val_fraction: float = 0.1,
        max_documents: int | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("context", context, 2),
            ("min_tokens", min_tokens, 2),
            ("batch_size", batch_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
        if not 0 < val_fraction < 1:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction!r}.")
        if max_documents is not None and (not isinstance(max_documents, int) or max_documents < 2):
            raise ValueError(f"`max_documents` must be None or an int >= 2, got {max_documents!r}.")
        self.files, self.context, self.separator = files, context, separator
        self.min_tokens, self.val_fraction, self.max_documents = (
            min_tokens,
            val_fraction,
            max_documents,
        )
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.vocab_size = 256
        self._sets: dict[str, TokenDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self._sets:
            return
        files = _text_files(self.files)
        docs = (
            read_documents(files, self.separator)
            if self.separator
            else [
                line.strip().encode("utf-8")
                for f in files
                for line in f.read_text(encoding="utf-8", errors="replace").splitlines()
                if line.strip()
            ]
        )
        docs = [d for d in docs if len(d) >= self.min_tokens]
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        order = torch.randperm(len(docs), generator=g, device="cpu").tolist()
        if self.max_documents is not None:
            order = order[: self.max_documents]
        n_val = max(1, round(self.val_fraction * len(order)))
        if len(order) - n_val < 1:
            raise ValueError(
                f"{len(order)} documents of at least {self.min_tokens} tokens: too few to split."
            )
        for split, idx in (("val", order[:n_val]), ("train", order[n_val:])):
            ids = torch.full((len(idx), self.context), PAD, dtype=torch.long, device="cpu")
            mask = torch.zeros(len(idx), self.context, dtype=torch.long, device="cpu")
            for row, i in enumerate(idx):
                tokens = torch.frombuffer(bytearray(docs[i][: self.context]), dtype=torch.uint8)
                ids[row, : len(tokens)] = tokens.long()
                mask[row, : len(tokens)] = 1
            self._sets[split] = TokenDataset(ids, mask)

    def dataset(self, split: str) -> TokenDataset:
        """The ``"train"`` or ``"val"`` rows (fixed: no augmentation)."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"`split` must be 'train', 'val' or 'test', got {split!r}.")
        self.setup()
        return self._sets["val" if split == "test" else split]

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            # the order from (seed, epoch): a resumed fit sees the uninterrupted one's batches
            sampler=EpochSeededSampler.for_fit(dataset, self.seed, self.trainer),
            # the workers' seeds from the loader's own generator, not the global stream
            generator=torch.Generator(device="cpu").manual_seed(self.seed),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset("val"), batch_size=self.batch_size, num_workers=self.num_workers
        )
