"""Tiny Hugging Face sequence classifiers built from configs (no download), one per family,
for the tests of auxhead on transformers: 2 layers, hidden size 32, 2 heads."""

from __future__ import annotations

import torch

FAMILIES = ["bert", "distilbert", "roberta", "electra"]

# Each family's encoder layers, as auxhead.list_layers names them.
LAYERS = {
    "bert": ["bert.encoder.layer.0", "bert.encoder.layer.1"],
    "distilbert": ["distilbert.transformer.layer.0", "distilbert.transformer.layer.1"],
    "roberta": ["roberta.encoder.layer.0", "roberta.encoder.layer.1"],
    "electra": ["electra.encoder.layer.0", "electra.encoder.layer.1"],
}
VOCAB = 100
PAD = 1  # RoBERTa's padding id (its positions count from it); the others use 0


def tiny(family: str, num_labels: int = 2, dropout: float = 0.1):
    """A freshly initialised `<Family>ForSequenceClassification`, in training mode."""
    import transformers as tr

    common = {"vocab_size": VOCAB, "max_position_embeddings": 64, "num_labels": num_labels}
    if family == "distilbert":
        config = tr.DistilBertConfig(
            dim=32, n_layers=2, n_heads=2, hidden_dim=64, dropout=dropout, **common
        )
        return tr.DistilBertForSequenceClassification(config).train()
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    sizes |= {"intermediate_size": 64, "hidden_dropout_prob": dropout}
    if family == "bert":
        return tr.BertForSequenceClassification(tr.BertConfig(**sizes, **common)).train()
    if family == "roberta":
        config = tr.RobertaConfig(**sizes, **common, pad_token_id=PAD)
        return tr.RobertaForSequenceClassification(config).train()
    if family == "electra":
        config = tr.ElectraConfig(**sizes, **common, embedding_size=32)
        return tr.ElectraForSequenceClassification(config).train()
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def pad_id(family: str) -> int:
    return PAD if family == "roberta" else 0


def batch(sentences: list[torch.Tensor], family: str, width: int | None = None) -> dict:
    """`input_ids` and `attention_mask` for `sentences` (1-D id tensors), right-padded to
    `width` (default: the longest)."""
    width = width or max(len(s) for s in sentences)
    ids = torch.full((len(sentences), width), pad_id(family), dtype=torch.long)
    mask = torch.zeros(len(sentences), width, dtype=torch.long)
    for row, sentence in enumerate(sentences):
        ids[row, : len(sentence)] = sentence
        mask[row, : len(sentence)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def sentences(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=generator) for n in lengths]
