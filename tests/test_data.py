import gzip
import importlib.util
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from auxhead import data as data_module
from auxhead.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    DataError,
    ImageData,
    MixedSizes,
    dataloaders,
    load_data,
    read_idx,
)

needs_fmnist = pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason=f"Fashion-MNIST not installed at {FASHION_MNIST_DIR}"
)


def write_idx(path, array: np.ndarray, type_byte: int = 0x08, gz: bool = False) -> None:
    """The idx format by hand: 0, 0, type, ndim, big-endian int32 sizes, big-endian data."""
    dtype = {0x08: ">u1", 0x0C: ">i4"}[type_byte]
    header = bytes([0, 0, type_byte, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    raw = header + array.astype(dtype).tobytes()
    with (gzip.open if gz else open)(path, "wb") as file:
        file.write(raw)


def write_idx_folder(folder, gz=True, dotted=False, skip=()):
    """Three 2x3 training images (labels 0, 1, 2) and two test images (labels 2, 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": np.arange(18).reshape(3, 2, 3) * 10,
        "train-labels-idx1-ubyte": np.array([0, 1, 2]),
        "t10k-images-idx3-ubyte": np.full((2, 2, 3), 255),
        "t10k-labels-idx1-ubyte": np.array([2, 0]),
    }
    for stem, array in arrays.items():
        if stem in skip:
            continue
        name = stem.replace("-idx", ".idx") if dotted else stem
        write_idx(folder / (name + (".gz" if gz else "")), array, gz=gz)
    return folder


def write_png(path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def gray(value, shape=(6, 6)):
    return np.full(shape, value)


# idx files -------------------------------------------------------------------------------------


def test_read_idx_ubyte_hand_checked(tmp_path):
    # magic 0x00000803 (ubyte, 3 dims), sizes 1, 2, 3, then the 6 pixel bytes
    (tmp_path / "x").write_bytes(bytes.fromhex("00000803 00000001 00000002 00000003 000aff07 0809"))
    array = read_idx(tmp_path / "x")
    assert array.dtype == np.uint8 and array.shape == (1, 2, 3)
    assert array.tolist() == [[[0, 10, 255], [7, 8, 9]]]


def test_write_idx_helper_matches_the_format(tmp_path):
    write_idx(tmp_path / "x", np.array([[[0, 10, 255], [7, 8, 9]]]))
    assert (tmp_path / "x").read_bytes().hex() == "00000803000000010000000200000003000aff070809"


def test_read_idx_int32_gz_big_endian(tmp_path):
    write_idx(tmp_path / "y.gz", np.array([1, -2, 70000]), type_byte=0x0C, gz=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "y.gz"), [1, -2, 70000])


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(DataError, match="is not an idx file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.arange(12).reshape(3, 4))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize(("gz", "dotted"), [(True, False), (False, False), (False, True)])
def test_load_idx_folder(tmp_path, gz, dotted):
    data = load_data(write_idx_folder(tmp_path / "mnist", gz=gz, dotted=dotted))
    assert data.name == "mnist" and data.classes == ["0", "1", "2"]
    assert data.train_x.shape == (3, 1, 2, 3) and data.train_x.dtype == torch.float32
    assert data.train_x[1, 0, 1, 2].item() == pytest.approx(110 / 255)  # image 1: 60..110
    assert data.train_y.tolist() == [0, 1, 2] and data.train_y.dtype == torch.int64
    assert data.valid_x.shape == (2, 1, 2, 3) and bool((data.valid_x == 1).all())
    assert data.valid_y.tolist() == [2, 0]


def test_idx_folder_named_fashion_gets_fashion_class_names(tmp_path):
    data = load_data(write_idx_folder(tmp_path / "FashionMNIST"))
    assert data.classes == FASHION_MNIST_CLASSES


def test_idx_folder_missing_a_file(tmp_path):
    folder = write_idx_folder(tmp_path / "mnist", skip=("t10k-labels-idx1-ubyte",))
    with pytest.raises(DataError, match=r"missing idx file\(s\) t10k-labels-idx1-ubyte\[\.gz\]"):
        load_data(folder)


def test_default_data_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError, match="sudo apt-get install dataset-fashion-mnist"):
        load_data()
    with pytest.raises(DataError, match="--data digits"):
        load_data("fashion-mnist")


# digits ---------------------------------------------------------------------------------------


def test_digits_shapes_range_and_split():
    data = load_data("digits")
    assert data.name == "digits" and data.c == 10 and data.channels == 1 and data.size == 8
    assert len(data.train_y) + len(data.valid_y) == 1797
    assert len(data.valid_y) == pytest.approx(0.2 * 1797, abs=10)
    assert data.train_x.min() >= 0 and data.train_x.max() == 1
    assert set(data.valid_y.tolist()) == set(range(10))  # stratified: every class held out


def test_digits_split_is_deterministic():
    a, b, c = load_data("digits"), load_data("digits"), load_data("digits", seed=1)
    torch.testing.assert_close(a.valid_x, b.valid_x)
    assert not torch.equal(a.valid_y, c.valid_y)
    assert len(load_data("digits", valid_pct=0.5).valid_y) == pytest.approx(1797 / 2, abs=10)


def test_size_resizes_any_data():
    data = load_data("digits", size=32)
    assert data.train_x.shape[1:] == (1, 32, 32) and data.size == 32
    assert data.train_x.min() >= 0 and data.train_x.max() <= 1


def test_subset_is_seeded():
    data = load_data("digits")
    small = data.subset(100, 50, seed=3)
    assert len(small.train_y) == 100 and len(small.valid_y) == 50
    torch.testing.assert_close(small.train_x, data.subset(100, 50, seed=3).train_x)
    assert len(data.subset(10**6).train_y) == len(data.train_y)
    assert "digits" in repr(small) and "100 train" in repr(small)
    with pytest.raises(ValueError, match="n_train must be at least 1, got 0"):
        data.subset(0)


def test_bad_arguments():
    with pytest.raises(DataError, match="valid_pct must be between 0 and 1.*got 1.5"):
        load_data("digits", valid_pct=1.5)
    with pytest.raises(DataError, match="size must be a positive number of pixels, got 0"):
        load_data("digits", size=0)
    with pytest.raises(ValueError, match=r"train_x must be \(N, C, H, W\)"):
        ImageData(
            "x", ["a"], torch.zeros(2, 3), torch.zeros(2), torch.zeros(1, 1, 2, 2), torch.zeros(1)
        )


# image folders --------------------------------------------------------------------------------


def test_image_folder_grayscale(tmp_path):
    for i in range(5):
        write_png(tmp_path / "imgs" / "cat" / f"{i}.png", gray(10 * i))
        write_png(tmp_path / "imgs" / "dog" / f"{i}.png", gray(200))
    (tmp_path / "imgs" / "dog" / "notes.txt").write_text("not an image")
    data = load_data(tmp_path / "imgs", valid_pct=0.4)
    assert data.name == "imgs" and data.classes == ["cat", "dog"] and data.channels == 1
    assert data.train_x.shape == (6, 1, 6, 6) and data.valid_x.shape == (4, 1, 6, 6)
    assert data.valid_y.tolist().count(0) == 2  # 40% of each class
    dog = data.train_x[data.train_y == 1]
    torch.testing.assert_close(dog, torch.full_like(dog, 200 / 255))


def test_image_folder_rgb_if_any_image_is_colour(tmp_path):
    write_png(tmp_path / "a" / "0.png", gray(0))
    write_png(tmp_path / "a" / "1.png", gray(0))
    write_png(tmp_path / "b" / "0.png", np.stack([gray(255), gray(0), gray(0)], axis=-1))
    write_png(tmp_path / "b" / "1.png", np.stack([gray(255), gray(0), gray(0)], axis=-1))
    data = load_data(tmp_path, valid_pct=0.5, size=4)
    assert data.channels == 3 and data.size == 4
    red = torch.cat([data.train_x, data.valid_x])[torch.cat([data.train_y, data.valid_y]) == 1]
    assert bool((red[:, 0] == 1).all()) and bool((red[:, 1:] == 0).all())


def test_image_folder_with_train_and_valid_subfolders(tmp_path):
    for split, n in (("train", 3), ("valid", 1)):
        for label in ("x", "y"):
            for i in range(n):
                write_png(tmp_path / split / label / f"{i}.png", gray(5))
    data = load_data(tmp_path)
    assert data.classes == ["x", "y"]
    assert data.train_y.tolist() == [0, 0, 0, 1, 1, 1] and data.valid_y.tolist() == [0, 1]


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no data set .*nothing-here.* no such file or folder"):
        load_data(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_data(tmp_path / "empty")
    write_png(tmp_path / "loose" / "0.png", gray(0))
    with pytest.raises(DataError, match="no class subfolders"):
        load_data(tmp_path / "loose")
    write_png(tmp_path / "one" / "cat" / "0.png", gray(0))
    with pytest.raises(DataError, match="single class 'cat'"):
        load_data(tmp_path / "one")
    for i in range(2):
        write_png(tmp_path / "sizes" / "a" / f"{i}.png", gray(0, (6, 6)))
        write_png(tmp_path / "sizes" / "b" / f"{i}.png", gray(0, (5, 6)))
    with pytest.raises(MixedSizes, match="is 6x5 but .* is 6x6; pass a size"):  # a DataError
        load_data(tmp_path / "sizes")
    assert load_data(tmp_path / "sizes", size=6, valid_pct=0.5).size == 6


def test_unreadable_image_is_named(tmp_path):
    write_png(tmp_path / "imgs" / "a" / "0.png", gray(0))
    (tmp_path / "imgs" / "b").mkdir()
    (tmp_path / "imgs" / "b" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png") as caught:
        load_data(tmp_path / "imgs")
    assert "remove the file or replace it with a readable image" in str(caught.value)


def test_a_class_only_in_valid_is_refused(tmp_path):
    for split, labels in (("train", ("x", "y")), ("valid", ("x", "y", "z"))):
        for label in labels:
            write_png(tmp_path / split / label / "0.png", gray(5))
    with pytest.raises(DataError, match=r"valid has class\(es\) 'z' that .*train does not"):
        load_data(tmp_path)


def test_too_few_images_to_split_names_no_python_only_option(tmp_path):
    for label in ("a", "b"):
        write_png(tmp_path / "imgs" / label / "0.png", gray(5))
    with pytest.raises(DataError, match="holding out 20% of the images for validation") as caught:
        load_data(tmp_path / "imgs")
    assert str(caught.value).startswith("holding out") and "use more images" in str(caught.value)


def test_a_file_is_not_a_data_set(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DataError, match="is a file; --data needs a folder"):
        load_data(tmp_path / "f.txt")


# Fashion-MNIST --------------------------------------------------------------------------------


@needs_fmnist
def test_fashion_mnist():
    data = load_data()
    assert data.name == "fashion-mnist" and data.classes == FASHION_MNIST_CLASSES
    assert data.train_x.shape == (60000, 1, 28, 28) and data.valid_x.shape == (10000, 1, 28, 28)
    assert data.train_y[0].item() == 9 and data.valid_y[0].item() == 9  # both ankle boots
    assert data.train_x.min() == 0 and data.train_x.max() == 1
    assert torch.bincount(data.train_y).tolist() == [6000] * 10


# fastai DataLoaders ---------------------------------------------------------------------------

needs_fastai = pytest.mark.skipif(
    importlib.util.find_spec("fastai") is None, reason="fastai is not installed"
)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


@needs_fastai
def test_dataloaders_batches(digits):
    from fastai.torch_core import TensorCategory, TensorImageBW

    dls = dataloaders(digits, bs=64, device="cpu")
    assert dls.c == 10 and list(dls.vocab) == digits.classes
    xb, yb = dls.one_batch()
    assert type(xb) is TensorImageBW and type(yb) is TensorCategory
    assert xb.shape == (64, 1, 8, 8) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert len(dls.train) == len(digits.train_y) // 64  # drops the last partial batch
    xv, _ = dls.valid.one_batch()  # not shuffled: the data's own order
    torch.testing.assert_close(xv.as_subclass(torch.Tensor), digits.valid_x[:64])
    assert sum(len(y) for _, y in dls.valid) == len(digits.valid_y)


@needs_fastai
def test_dataloaders_are_deterministic(digits):
    first = [dataloaders(digits, bs=32, seed=s, device="cpu").one_batch()[1] for s in (0, 0, 1)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])
    dls = dataloaders(digits, bs=32, device="cpu")
    epochs = [torch.cat([y for _, y in dls.train]) for _ in range(2)]
    assert not torch.equal(epochs[0], epochs[1])  # a new order each epoch
    ordered = dataloaders(digits, bs=32, device="cpu", shuffle_train=False)
    torch.testing.assert_close(torch.cat([y for _, y in ordered.train]), digits.train_y)


@needs_fastai
def test_dataloaders_repeats_pass_over_the_training_set_several_times_an_epoch():
    x = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1).expand(10, 1, 4, 4) / 10
    y = torch.arange(10) % 2
    toy = ImageData("toy", ["even", "odd"], x.clone(), y, x[:4].clone(), y[:4].clone())
    dls = dataloaders(toy, bs=6, repeats=3, device="cpu")
    assert len(dls.train) == 5 and len(dls.valid) == 1  # 30 draws an epoch; valid: one pass
    for _ in range(2):
        seen = torch.cat([xb[:, 0, 0, 0] for xb, _ in dls.train]) * 10
        # every image exactly 3 times an epoch, shuffled together (not 3 runs of one order)
        assert torch.equal(torch.bincount(seen.round().long(), minlength=10), torch.full((10,), 3))
        assert not torch.equal(seen[:10], seen[10:20])
    ordered = dataloaders(toy, bs=4, repeats=2, device="cpu", shuffle_train=False)
    labels = torch.cat([yb for _, yb in ordered.train])
    assert torch.equal(labels, torch.cat([y, y]))
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=f"repeats must be an integer >= 1, got {bad!r}"):
            dataloaders(toy, repeats=bad)


@needs_fastai
def test_dataloaders_rgb_batches_are_tensor_images(tmp_path):
    from fastai.torch_core import TensorImage, TensorImageBW

    rgb = ImageData("rgb", ["a", "b"], torch.rand(8, 3, 4, 4), torch.arange(8) % 2,
                    torch.rand(4, 3, 4, 4), torch.arange(4) % 2)  # fmt: skip
    xb, _ = dataloaders(rgb, bs=4, device="cpu").one_batch()
    assert type(xb) is TensorImage and not isinstance(xb, TensorImageBW)


@pytest.fixture(scope="module")
def learner(digits):
    from fastai.callback.schedule import fit_one_cycle  # noqa: F401
    from fastai.learner import Learner
    from fastai.metrics import accuracy

    from auxhead.models import small_cnn

    torch.manual_seed(0)
    dls = dataloaders(digits, bs=64, device="cpu")
    learn = Learner(
        dls, small_cnn(10, channels=1, size=8), metrics=accuracy
    )  # loss from Categorize
    # One thread: a tiny model gains nothing from more, and on a busy CPU they spin.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(1, 1e-2)
        yield learn
    finally:
        torch.set_num_threads(threads)


@needs_fastai
def test_learner_fits_and_predicts(learner, digits):
    with learner.no_bar():
        preds, targs = learner.get_preds()
        _, acc = learner.validate()
        label, index, probs = learner.predict(digits.valid_x[0])
    assert preds.shape == (len(digits.valid_y), 10) and torch.equal(targs, digits.valid_y)
    assert acc > 0.5  # one epoch on 1,437 images
    assert label == digits.classes[index] and probs.shape == (10,)


@needs_fastai
def test_interpretation_and_show_results(learner):
    import matplotlib

    matplotlib.use("Agg")
    import fastai.vision.learner  # noqa: F401  (plot_top_losses for images, as fastai.vision.all)
    from fastai.interpret import ClassificationInterpretation

    with learner.no_bar():
        interp = ClassificationInterpretation.from_learner(learner)
        matrix = interp.confusion_matrix()
        assert matrix.shape == (10, 10) and matrix.sum() == len(learner.dls.valid_ds)
        interp.plot_top_losses(2)  # rebuilds items through test_dl(with_labels=True)
        learner.show_results(max_n=2)
        learner.dls.show_batch(max_n=2)


@pytest.mark.slow  # a subprocess
@needs_fastai
def test_export_loads_with_plain_fastai(learner, tmp_path):
    learner.export(tmp_path / "export.pkl")
    assert b"auxhead" not in (tmp_path / "export.pkl").read_bytes()
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["auxhead"] = None  # any import of auxhead now fails
        warnings.filterwarnings("ignore")
        import torch
        from fastai.learner import load_learner
        learn = load_learner(sys.argv[1])
        label, index, probs = learn.predict(torch.rand(1, 8, 8))
        print("predicted", label, int(index))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-I", "-c", script, str(tmp_path / "export.pkl")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("predicted")]
    _, label, index = lines[-1].split()  # fastai's progress bar prints too
    assert label == str(index)  # digits' class names are "0".."9"


@needs_fastai
def test_dataloaders_pickle_without_items_has_no_auxhead_class(learner):
    empty = learner.dls.new_empty()
    assert type(empty.valid).__name__ == "TfmdDL"
    assert b"auxhead" not in pickle.dumps(empty)


def test_an_idx_folder_with_one_class_is_refused(tmp_path):
    folder = write_idx_folder(tmp_path / "one", gz=False)
    write_idx(folder / "train-labels-idx1-ubyte", np.array([3, 3, 3]))
    write_idx(folder / "t10k-labels-idx1-ubyte", np.array([3, 3]))
    with pytest.raises(DataError, match="every label in its idx files is 3; .* at least two"):
        load_data(folder)
