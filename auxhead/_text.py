"""Text data: the MR sentence-polarity set (Pang & Lee 2005) as token ids for a transformer.

Sentences are read from a folder holding `rt-polarity.pos` and `rt-polarity.neg` (one sentence
a line, Latin-1), split into training and validation sentences with a seed, and tokenised by
a byte-pair encoding (BPE) tokenizer that the `tokenizers` library trains on the training sentences
alone: nothing is downloaded, and no validation word shapes the vocabulary. The datasets are
plain `torch.utils.data.Dataset`s of dicts (`input_ids`, `attention_mask`, `labels`), which a
`DataLoader` or the Hugging Face `Trainer` takes with `collate_fn=data.collate` (padding each
batch to its longest sentence, `attention_mask` 0 at the padding).

`tokenizers` (the `transformers` extra) is imported by `load_mr` only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

from auxhead._errors import DataError
from auxhead._extras import raise_missing_extra

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["MR_CLASSES", "MR_TINY", "TextData", "TokenDataset", "load_mr", "read_mr"]

# 400 MR sentences shipped in the repository (data/mr-tiny/, with a README saying where they
# come from and how they were chosen); a pip-installed auxhead does not have them.
MR_TINY = Path(__file__).resolve().parent.parent / "data" / "mr-tiny"

MR_CLASSES = ["negative", "positive"]  # label 0, label 1
_MR_FILES = {"rt-polarity.neg": 0, "rt-polarity.pos": 1}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]  # ids 0, 1, 2, 3


def read_mr(path: str | Path = MR_TINY) -> tuple[list[str], list[int]]:
    """The sentences of an MR folder and their labels (0 negative, 1 positive), negatives
    first, each file in its own order.

    Raises:
        DataError: the folder or one of its two files is missing.
    """
    folder = Path(path)
    missing = [name for name in _MR_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"{folder} has no {' or '.join(missing)}: an MR folder holds rt-polarity.pos and "
            "rt-polarity.neg (rt-polaritydata.tar.gz from "
            "https://www.cs.cornell.edu/people/pabo/movie-review-data/). auxhead's checkout "
            f"ships 400 of its sentences in {MR_TINY}."
        )
    texts, labels = [], []
    for name, label in _MR_FILES.items():
        # Latin-1, as the authors wrote them: every byte is a character, nothing fails.
        # Split at "\n" alone: str.splitlines would also split at \x85 and \x1c, which are
        # characters of some sentences here.
        lines = (folder / name).read_text(encoding="latin-1").split("\n")
        sentences = [line.strip() for line in lines if line.strip()]
        texts += sentences
        labels += [label] * len(sentences)
    return texts, labels


class TokenDataset(Dataset):
    """Tokenised sentences and their labels. Item i is a dict of `input_ids` (n_i,),
    `attention_mask` (n_i,) of ones and `labels` (a 0-d int64), unpadded; `collate` pads a
    list of them into a batch.

    Attributes:
        ids: the token ids of each sentence ([CLS] first, [SEP] last).
        labels: one class index per sentence.
        pad_id: the id `collate` pads with.
    """

    def __init__(self, ids: Sequence[Sequence[int]], labels: Sequence[int], pad_id: int = 0):
        if len(ids) != len(labels):
            raise ValueError(f"{len(ids)} sentences but {len(labels)} labels")
        self.ids = [list(sentence) for sentence in ids]
        self.labels = list(labels)
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor(self.ids[index], dtype=torch.long)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor(self.labels[index], dtype=torch.long),
        }

    def collate(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """A batch: `input_ids` and `attention_mask` (B, N) right-padded to the longest of the
        items (mask 0 at the padding), `labels` (B,)."""
        width = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(items), width, dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n] = item["input_ids"]
            mask[row, :n] = 1
        labels = torch.stack([torch.as_tensor(item["labels"]) for item in items])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def batch(self, indices: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """The sentences at `indices` (default: all) as one padded batch."""
        indices = range(len(self)) if indices is None else indices
        return self.collate([self[i] for i in indices])

    def __repr__(self) -> str:
        return f"TokenDataset({len(self)} sentences, pad_id={self.pad_id})"


@dataclass
class TextData:
    """Training and validation sentences, tokenised, with the tokenizer trained on the first.

    Attributes:
        train, valid: `TokenDataset`s; pass `collate_fn=data.collate` to a DataLoader
            (`data_collator=data.collate` to the Hugging Face `Trainer`).
        tokenizer: the `tokenizers.Tokenizer`; `tokenizer.save("tokenizer.json")` keeps it
            (`transformers.PreTrainedTokenizerFast(tokenizer_file=...)` reads it back).
        classes: the class names, by label.
        train_texts, valid_texts: the sentences as read.
    """

    train: TokenDataset
    valid: TokenDataset
    tokenizer: Tokenizer
    classes: list[str] = field(default_factory=lambda: list(MR_CLASSES))
    train_texts: list[str] = field(default_factory=list, repr=False)
    valid_texts: list[str] = field(default_factory=list, repr=False)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def pad_id(self) -> int:
        return self.train.pad_id

    @property
    def c(self) -> int:
        """The number of classes."""
        return len(self.classes)

    def collate(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """`TokenDataset.collate`: a padded batch of dataset items."""
        return self.train.collate(items)

    def __repr__(self) -> str:
        return (
            f"TextData(train={len(self.train)}, valid={len(self.valid)}, "
            f"vocab_size={self.vocab_size}, classes={self.classes})"
        )


def _train_tokenizer(texts: Sequence[str], vocab_size: int, max_length: int) -> Tokenizer:
    """A byte-pair-encoding tokenizer trained on `texts`: words split at spaces and
    punctuation, then into the pieces BPE merged, [CLS] before and [SEP] after.

    BPE, not WordPiece: `tokenizers`' WordPiece trainer breaks ties in hash order, so the same
    sentences give a different vocabulary from one run to the next; its BPE trainer gives the
    same tokens, with the same ids, every time (and the same seed must give the same data)."""
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    except ModuleNotFoundError as error:
        raise_missing_extra(error, "auxhead.data.load_mr")
        raise
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer.enable_truncation(max_length)
    return tokenizer


def load_mr(
    path: str | Path = MR_TINY,
    *,
    valid_pct: float = 0.1,
    seed: int = 0,
    vocab_size: int = 4000,
    max_length: int = 64,
) -> TextData:
    """MR sentences, split with `seed`, as token ids from a tokenizer trained on the training
    sentences only.

    Args:
        path: a folder with `rt-polarity.pos` and `rt-polarity.neg` (Latin-1). Default: the
            400 sentences shipped in the repository (`MR_TINY`); the full set has 10,662.
        valid_pct: the share of sentences held out for validation, in (0, 1).
        seed: the split's seed (the same seed, the same split).
        vocab_size: the most tokens the tokenizer learns (its 4 special tokens included:
            [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3).
        max_length: sentences longer than this many tokens ([CLS] and [SEP] included) are cut.

    Returns:
        A `TextData` (`.train`, `.valid`, `.tokenizer`, `.collate`, `.classes`).

    Raises:
        DataError: the folder lacks one of the two files.
        ValueError: a `valid_pct`, `vocab_size` or `max_length` out of range.
        ModuleNotFoundError: `tokenizers` is not installed (`pip install 'auxhead[transformers]'`).

    Example:
        >>> data = auxhead.data.load_mr()  # 360 training, 40 validation sentences
        >>> batch = data.collate([data.train[i] for i in range(8)])  # input_ids (8, N), ...
    """
    if not isinstance(valid_pct, (int, float)) or not 0 < valid_pct < 1:
        raise ValueError(f"valid_pct must be in (0, 1), such as 0.1; got {valid_pct!r}")
    if not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL):
        raise ValueError(f"vocab_size must be a whole number > {len(SPECIAL)}; got {vocab_size!r}")
    if not isinstance(max_length, int) or max_length < 3:
        raise ValueError(f"max_length must be a whole number >= 3; got {max_length!r}")
    texts, labels = read_mr(path)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_valid = max(1, round(valid_pct * len(texts)))
    valid_rows, train_rows = order[:n_valid], order[n_valid:]
    train_texts = [texts[i] for i in train_rows]
    valid_texts = [texts[i] for i in valid_rows]
    trained = _train_tokenizer(train_texts, vocab_size, max_length)

    def encode(rows: list[int], sentences: list[str]) -> TokenDataset:
        ids = [trained.encode(sentence).ids for sentence in sentences]  # one thread
        return TokenDataset(ids, [labels[i] for i in rows], pad_id=0)

    return TextData(
        train=encode(train_rows, train_texts),
        valid=encode(valid_rows, valid_texts),
        tokenizer=trained,
        train_texts=train_texts,
        valid_texts=valid_texts,
    )
