"""The forum question, answered: Inception-style auxiliary classifiers on a fastai vision
learner, with each head's accuracy in the training table and a per-head plot.

Run: .venv/bin/python examples/fastai_inception.py   (Fashion-MNIST; falls back to digits)
"""

from pathlib import Path

from fastai.vision.all import accuracy, resnet18, vision_learner

from auxhead.data import DataError, dataloaders, load_data
from auxhead.fastai import AuxHeads, export_learner

try:
    data = load_data().subset(2000, 1000, seed=0)  # Fashion-MNIST, 28x28
except DataError:
    data = load_data("digits", size=28)
dls = dataloaders(data, bs=128, seed=0)

# GoogLeNet-style heads after two of resnet18's stages ("0.5" is layer2, "0.6" is layer3 in
# the body fastai builds), weighted 0.3 as in the paper.
learn = vision_learner(
    dls,
    resnet18,
    pretrained=False,
    n_in=1,
    metrics=accuracy,
    cbs=AuxHeads(["0.5", "0.6"], head="inception", weights=0.3),
)
learn.fit_one_cycle(3, 3e-3)

out = Path("runs/fastai_inception")
out.mkdir(parents=True, exist_ok=True)
learn.aux_heads.plot_heads().savefig(out / "heads.png", dpi=120)
export_learner(learn, out.resolve() / "export.pkl")  # opens with plain fastai's load_learner
print(f"wrote {out / 'heads.png'} and {out / 'export.pkl'}")
