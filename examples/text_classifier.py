"""Auxiliary heads on a Hugging Face text classifier, in a plain PyTorch loop.

A 4-layer BERT built from a config (nothing downloaded) learns the polarity of the 400 MR
movie-review sentences shipped in data/mr-tiny, with a head on every encoder layer pooling the
[CLS] token. Padding never changes a head's output: it reads the attention_mask the model is
called with. Takes a few seconds on a CPU; with the Hugging Face Trainer instead of this loop,
use `auxhead.hf.AuxTrainer` (docs/api/transformers.md).

This shows the mechanics, not accuracy: trained from scratch on 360 sentences, the model learns
them by heart and stays near chance (50%) on the 40 held out. For a real classifier, point
`load_mr` at the full set (10,662 sentences: `load_mr("path/to/mr")`).

Run: OMP_NUM_THREADS=1 .venv/bin/python examples/text_classifier.py
"""

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import auxhead
from auxhead.data import load_mr

torch.manual_seed(0)
data = load_mr(vocab_size=1000, max_length=48)  # 360 training, 40 validation sentences
print(data)

config = BertConfig(
    vocab_size=data.vocab_size,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
    num_labels=2,
)
model = BertForSequenceClassification(config)
sample = data.train.batch(range(4))  # a dict: input_ids, attention_mask, labels

# The encoder layers, by the names list_layers gives them (it takes keyword samples).
layers = [info.name for info in auxhead.list_layers(model, sample) if info.type == "BertLayer"]
aux_model = auxhead.attach(model, layers, num_classes=2, head="linear", pool="cls", sample=sample)
aux_loss = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux_model, weights=0.3, distill=0.5)
opt = torch.optim.AdamW(aux_model.parameters(), lr=1e-3)
loader = torch.utils.data.DataLoader(
    data.train, batch_size=32, shuffle=True, collate_fn=data.collate
)
valid = data.valid.batch()

epochs = 8
for epoch in range(epochs):
    aux_model.train()
    for batch in loader:
        aux_loss.progress = epoch / epochs
        out = aux_model(**batch)  # a SequenceClassifierOutput, as without heads
        # The model's own loss, plus the heads' (AuxLoss: weights, schedule, distillation).
        loss = out.loss + aux_loss.aux_term(out.logits, batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    aux_model.eval()
    with torch.no_grad(), aux_model.heads_enabled():
        out = aux_model(**valid)
    accuracy = {
        name.split(".")[-1]: (logits.argmax(1) == valid["labels"]).float().mean().item()
        for name, logits in aux_model.aux_outputs.items()
    }
    accuracy["main"] = (out.logits.argmax(1) == valid["labels"]).float().mean().item()
    print(
        f"epoch {epoch}  loss {loss.item():.3f}  "
        + "  ".join(f"acc[{k}] {v:.2f}" for k, v in accuracy.items())
    )

# Take the heads off: the BertForSequenceClassification itself, ready for save_pretrained.
model = aux_model.strip()
print(type(model).__name__, "with", sum(p.numel() for p in model.parameters()), "parameters")
