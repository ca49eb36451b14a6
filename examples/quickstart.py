"""Auxiliary classifiers in a plain PyTorch loop, on scikit-learn's bundled digits.

Run: .venv/bin/python examples/quickstart.py
"""

import torch
from torch import nn

import auxhead
from auxhead.data import load_data

torch.manual_seed(0)
data = load_data("digits")  # 8x8 images, 10 classes: 1437 train / 360 valid

model = nn.Sequential(
    nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),   # 0-2: 8x8
    nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),  # 3-5: 4x4
    nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),  # 6-8: 2x2
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
)  # fmt: skip

# Which layers can take a head? Every named module that runs, with its output shape.
print(auxhead.list_layers(model, data.train_x[:1]))

# Heads at two depths, sized by a dry run on a sample batch.
aux_model = auxhead.attach(model, ["2", "5"], head="linear", sample=data.train_x[:2])
loss_func = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux_model, weights=0.3, schedule="linear_decay")
opt = torch.optim.Adam(aux_model.parameters(), lr=3e-3)

epochs, bs = 8, 64
for epoch in range(epochs):
    aux_model.train()
    for i in torch.randperm(len(data.train_y)).split(bs):
        loss_func.progress = epoch / epochs  # the schedule fades the heads out
        loss = loss_func(aux_model(data.train_x[i]), data.train_y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Heads do not run in eval mode unless asked: here we ask, to see each head's accuracy.
    aux_model.eval()
    with torch.no_grad(), aux_model.heads_enabled():
        out, aux_out = aux_model.forward_with_aux(data.valid_x)
    accuracy = {
        name: (o.argmax(1) == data.valid_y).float().mean().item() for name, o in aux_out.items()
    }
    accuracy["main"] = (out.argmax(1) == data.valid_y).float().mean().item()
    print(
        f"epoch {epoch}  loss {loss.item():.3f}  "
        + "  ".join(f"acc[{k}] {v:.3f}" for k, v in accuracy.items())
    )

# For inference, take the heads off: the original model, no hooks, same weights.
model = aux_model.strip()
print(type(model).__name__, "with", sum(p.numel() for p in model.parameters()), "parameters")
