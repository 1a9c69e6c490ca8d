"""Datasets of any image shape and class count: TFDS (through TFDS's own mock data, since nothing can be
downloaded here), IDX files of other sizes, and folders of image files (real Fashion-MNIST garments saved
as coloured JPEGs of another size). The shape and the classes come from the data in every run.

The TFDS tests use `tfds.testing.mock_data(policy=USE_CODE)`: TFDS's real builders and loading code with
generated examples in place of the download (the one part that cannot run offline).
"""

import json
import os

import numpy as np
import pytest

from helpers import FASHION_DIR, main_in_fresh_interpreter, read_metrics, run_cli, run_task


def serving(model_dir):
    import tensorflow as tf

    return tf.saved_model.load(model_dir).signatures["serving_default"]


def served_shape(signature):
    spec = signature.structured_input_signature[1]["image"]
    return spec.dtype.name, spec.shape.as_list()


# ------------------------------------------------------------------------------------------ TFDS

def test_two_tfds_datasets_of_different_shapes_train_and_export_in_one_process(tmp_path):
    """cifar10 (32x32x3, 10 classes), then emnist/balanced (28x28x1, 47 classes), in this one process:
    neither's shape or class count sticks to the other."""
    import tensorflow_datasets as tfds

    runs = {"cifar10": ([None, 32, 32, 3], 10), "emnist/balanced": ([None, 28, 28], 47)}
    with tfds.testing.mock_data(num_examples=256, policy=tfds.testing.MockPolicy.USE_CODE):
        for name, (shape, classes) in runs.items():
            job_dir = str(tmp_path / name.replace("/", "-"))
            code, out, err = run_task(["--dataset", name, "--preset", "seed", "--epochs", "1", "--batch-size", "32",
                                       "--job-dir", job_dir])
            assert code == 0, err[-3000:]
            signature = serving(os.path.join(job_dir, "model"))
            assert served_shape(signature) == ("uint8", shape)
            batch = np.random.default_rng(0).integers(0, 256, [3, *shape[1:]], dtype=np.uint8)
            probabilities = signature(image=batch)["probabilities"].numpy()
            assert probabilities.shape == (3, classes)
            np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
            with open(os.path.join(job_dir, "model", "training_images.json")) as handle:
                described = json.load(handle)
            with open(os.path.join(job_dir, "model", "class_names.json")) as handle:
                names = json.load(handle)
            assert len(names) == classes and described["class_names"] == names
            channels = 1 if len(shape) == 3 else 3
            assert (described["height"], described["width"], described["channels"]) == (shape[1], shape[2], channels)
            assert described["preprocess"] == "frame" and described["version"] == 1
            assert f"{shape[1]}x{shape[2]}x{channels} images, {classes} classes" in out
    assert len(read_metrics(str(tmp_path / "cifar10"))["class_names"]) == 10


def test_emnist_images_are_turned_upright_and_other_datasets_left_as_they_are():
    """TFDS keeps EMNIST's images as its files store them, transposed (a letter's rows are its columns); the
    loader turns them upright. cifar10 is loaded pixel for pixel as TFDS serves it."""
    import tensorflow_datasets as tfds

    from trainer.data import load_tfds

    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        for name, turned in (("emnist/balanced", True), ("cifar10", False)):
            served = np.concatenate([images for images, _ in tfds.as_numpy(
                tfds.builder(name).as_dataset(split="train", as_supervised=True).batch(16))])
            arrays, _, _ = load_tfds(name, None)
            if turned:
                served = np.swapaxes(served[..., 0], 1, 2)
            assert np.array_equal(arrays["train_images"], served), name


def test_flips_follow_the_dataset_unless_a_flag_says():
    from trainer.config import Config
    from trainer.data import FLIP_SAFE_TFDS, Splits, epoch_augment, tfds_base

    assert "cifar10" in FLIP_SAFE_TFDS
    assert not {"svhn_cropped", "emnist", "mnist", "fashion_mnist", "kmnist"} & set(FLIP_SAFE_TFDS)
    assert tfds_base("emnist/balanced:3.*") == "emnist"
    empty = (np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.int64))
    photos = Splits("cifar10", tuple("ab"), empty, empty, empty, flips_keep_label=True)
    digits = Splits("mnist", tuple("ab"), empty, empty, empty)
    default = Config(job_dir="/tmp/x")  # shift from epoch 3 on
    assert [epoch_augment(default, photos, epoch) for epoch in (0, 2)] == ["none", "shift-flip"]
    assert epoch_augment(default, digits, 2) == "shift"  # MNIST-format data: as before
    assert epoch_augment(Config(job_dir="/tmp/x", flip=False), photos, 2) == "shift"
    assert epoch_augment(Config(job_dir="/tmp/x", flip=True), digits, 2) == "shift-flip"
    assert epoch_augment(Config(job_dir="/tmp/x", augment="shift-flip"), digits, 2) == "shift-flip"


def test_shifts_scale_with_the_image_size_and_stay_two_pixels_at_28():
    from trainer.augment import MAX_SHIFT, max_shift

    assert max_shift(28, 28) == MAX_SHIFT == 2
    assert [max_shift(side, side) for side in (8, 32, 36, 64)] == [1, 2, 3, 5]
    assert max_shift(64, 28) == 2  # the shorter side


# ------------------------------------------------------------------------------------------ IDX

def test_idx_files_of_another_size_and_more_classes_give_their_shape(tmp_path, digits):
    from trainer.config import Config
    from trainer.data import load_splits, write_idx

    images, labels = digits
    small = images[:300, 4:24, 4:24]  # 20x20
    labels = (labels[:300] + np.arange(300) % 2 * 10).astype(np.uint8)  # 20 classes: 0-19
    write_idx(str(tmp_path), "train", small[:200], labels[:200])
    write_idx(str(tmp_path), "test", small[200:], labels[200:])
    splits = load_splits(Config(job_dir="/tmp/x", dataset=f"idx:{tmp_path}"))
    assert tuple(splits.shape) == (20, 20, 1, 20)
    assert splits.class_names == tuple(str(label) for label in range(20))
    assert splits.train[0].shape[1:] == (20, 20)


def test_the_export_of_28x28_grey_10_classes_keeps_its_signature(tmp_path):
    """The serving signature of MNIST-format models is exactly the one model folders are checked against."""
    import tensorflow as tf

    from trainer import model_folder
    from trainer.config import Config
    from trainer.export import export_model
    from trainer.model import build_model

    export_model(build_model(Config(job_dir="/tmp/x", preset="seed")), str(tmp_path / "model"),
                 [str(digit) for digit in range(10)])
    saved = model_folder.read_saved_model(str(tmp_path / "model"), "model")
    model_folder.check_signature(tf, saved, "model")  # raises when it differs
    signature = saved.meta_graphs[0].signature_def["serving_default"]
    assert model_folder._describe(tf, signature.inputs) == ["image uint8 [?,28,28]"]


# ------------------------------------------------------------------------------------------ folders

def hue_colours(count, rng):
    """`count` saturated RGB colours of random hues, floats in [0.35, 1]."""
    import colorsys

    return np.array([colorsys.hsv_to_rgb(hue, 1.0, 1.0) for hue in rng.random(count)]) * 0.65 + 0.35


def write_colour_garments(folder, classes, per_class, side=36, seed=0):
    """Real Fashion-MNIST garments of `classes` (label: folder name), each tinted with a random hue and
    resized 28 -> `side`, saved as RGB JPEGs in folder/NAME/."""
    from PIL import Image

    from trainer.data import load_idx_folder

    arrays = load_idx_folder(FASHION_DIR)
    images, labels = arrays["train_images"], arrays["train_labels"]
    rng = np.random.default_rng(seed)
    for label, name in classes.items():
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        chosen = np.flatnonzero(labels == label)[:per_class]
        for number, (index, colour) in enumerate(zip(chosen, hue_colours(len(chosen), rng), strict=True)):
            rgb = (images[index][..., None].astype(np.float32) * colour).astype(np.uint8)
            Image.fromarray(rgb).resize((side, side), Image.Resampling.BILINEAR).save(
                os.path.join(folder, name, f"{number:04d}.jpg"), quality=92)


GARMENTS = {0: "t-shirt", 1: "trouser", 7: "sneaker", 8: "bag"}


@pytest.mark.slow
def test_a_folder_of_coloured_jpegs_trains_to_85_percent(tmp_path, fashion_dir):
    """4 classes x 400 real garments as coloured 36x36 JPEGs: the trainer finds 4 classes of 36x36x3 images,
    holds out a test split, trains 4 epochs of the default recipe and exports a colour model."""
    folder = str(tmp_path / "garments")
    write_colour_garments(folder, GARMENTS, 400)
    job_dir = str(tmp_path / "job")
    result = run_cli(["--dataset", f"folder:{folder}", "--epochs", "4", "--job-dir", job_dir], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "36x36x3 images, 4 classes" in result.stdout
    metrics = read_metrics(job_dir)
    assert metrics["test_accuracy"] >= 0.85, metrics["test_accuracy"]
    assert metrics["class_names"] == sorted(GARMENTS.values())
    assert metrics["num_examples"]["test"] == 320  # a fifth of each class
    with open(os.path.join(job_dir, "model", "training_images.json")) as handle:
        described = json.load(handle)
    assert (described["height"], described["width"], described["channels"], described["preprocess"]) == \
        (36, 36, 3, "resize")
    check = ("import sys, json, numpy as np, tensorflow as tf\n"
             "serve = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
             "spec = serve.structured_input_signature[1]['image']\n"
             "out = serve(image=np.zeros([2, 36, 36, 3], np.uint8))['probabilities']\n"
             "print(json.dumps([spec.dtype.name, spec.shape.as_list(), out.shape.as_list()]))\n")
    import subprocess
    import sys

    from helpers import trainer_env

    loaded = subprocess.run([sys.executable, "-c", check, os.path.join(job_dir, "model")], env=trainer_env(),
                            capture_output=True, text=True, timeout=300)
    assert json.loads(loaded.stdout.strip().splitlines()[-1]) == ["uint8", [None, 36, 36, 3], [2, 4]], loaded.stderr

    # predict, as a user runs it, on one image of each class folder: each line names one of the folder's classes
    # in its class field (`INDEX (NAME)`), the image's own for (nearly) all of them
    images = [os.path.join(folder, name, "0001.jpg") for name in sorted(GARMENTS.values())]
    predicted = subprocess.run([sys.executable, "-m", "trainer.predict", "--model-dir", os.path.join(job_dir, "model"),
                                *images], env=trainer_env(), capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0 and predicted.stderr.strip() == "", predicted.stderr[-3000:]
    lines = [line.split("\t") for line in predicted.stdout.strip().splitlines()]
    assert [line[0] for line in lines] == images
    named = [line[1].split(" (")[1].rstrip(")") for line in lines]
    assert set(named) <= set(GARMENTS.values()), named
    assert sum(name == os.path.basename(os.path.dirname(path)) for name, path in zip(named, images, strict=True)) \
        >= 3, (named, images)


def write_pngs(folder, name, count, grey=False, side=12, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    for number in range(count):
        pixels = rng.integers(0, 256, (side, side) if grey else (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, name, f"{number}.png"))


def test_a_folder_reads_classes_sizes_and_channels_from_its_files(tmp_path):
    from trainer.data import holdout_test
    from trainer.image_folder import load_image_folder
    from trainer.images import to_model_pixels
    from trainer.predict.reading import image_to_rgb, open_image

    folder = str(tmp_path / "grey")
    write_pngs(folder, "b", 6, grey=True, side=12)
    write_pngs(folder, "a", 4, grey=True, side=12, seed=1)
    write_pngs(folder, "a/more", 1, grey=True, side=20, seed=2)  # nested: still class a; a rarer size
    (tmp_path / "grey" / "a" / "notes.txt").write_text("not an image")  # not read
    arrays, names = load_image_folder(folder)
    assert names == ("a", "b")
    assert arrays["all_images"].shape == (11, 12, 12)  # grey: one channel, the most common size
    assert sorted(arrays["all_labels"].tolist()) == [0] * 5 + [1] * 6
    _, test = holdout_test(arrays["all_images"], arrays["all_labels"])
    assert sorted(test[1].tolist()) == [0, 1]  # a fifth of each class, rounded (at least one)
    # the grey path gives exactly the contract's resize to one channel
    odd = os.path.join(folder, "a", "more", "0.png")
    arrays, _ = load_image_folder(folder, (9, 15))
    expected = to_model_pixels(image_to_rgb(open_image(odd)), 9, 15, 1)
    assert any(np.array_equal(image, expected) for image in arrays["all_images"])
    write_pngs(folder, "b", 1, grey=False, side=12, seed=3)  # one colour image makes the set colour
    arrays, _ = load_image_folder(folder)
    assert arrays["all_images"].shape[1:] == (12, 12, 3)


def test_reading_a_large_folder_says_how_far_it_is(tmp_path, monkeypatch, capsys):
    from trainer import image_folder

    folder = str(tmp_path / "photos")
    write_pngs(folder, "a", 3)
    write_pngs(folder, "b", 3, seed=1)
    monkeypatch.setattr(image_folder, "PROGRESS_SECONDS", 0.0)  # as if each file took the whole interval
    image_folder.load_image_folder(folder)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "reading images: 0 of 6 files" and lines[-1] == "reading images: 5 of 6 files", lines


def test_a_folder_with_its_own_split_keeps_it(tmp_path):
    from trainer.config import Config
    from trainer.data import load_splits

    for split, count in (("train", 8), ("validation", 3), ("test", 2)):
        for name in ("cat", "dog"):
            write_pngs(str(tmp_path / "pets" / split), name, count, side=10)
    splits = load_splits(Config(job_dir="/tmp/x", dataset=f"folder:{tmp_path / 'pets'}"))
    assert [len(part[0]) for part in (splits.train, splits.validation, splits.test)] == [16, 6, 4]
    assert splits.class_names == ("cat", "dog") and tuple(splits.shape) == (10, 10, 3, 2)
    assert splits.preprocess == "resize" and not splits.flips_keep_label


def test_an_unreadable_image_in_a_folder_is_named_and_stops_the_run(tmp_path):
    folder = tmp_path / "shapes"
    write_pngs(str(folder), "round", 5)
    write_pngs(str(folder), "square", 5)
    (folder / "square" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (folder / "round" / "readme.md").write_text("not an image, not read")
    code, out, err = run_task(["--dataset", f"folder:{folder}", "--job-dir", str(tmp_path / "job")])
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in err, err
    assert str(folder / "square" / "broken.png") in lines[0]
    assert "1 of 11 image files cannot be read" in lines[1]
    assert "readme.md" not in err and "epoch" not in out
    assert not (tmp_path / "job").exists()


@pytest.mark.parametrize("layout, expected", [
    ({}, "holds no class subfolders"),
    ({"only": 3}, "holds one class subfolder (only)"),
    ({"full": 3, "empty": 0}, "class subfolder empty holds no image files"),
], ids=["empty", "one class", "a class without images"])
def test_a_badly_laid_out_folder_is_one_line_before_tensorflow(tmp_path, layout, expected):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, count in layout.items():
        (folder / name).mkdir()
        write_pngs(str(folder), name, count)
    result = main_in_fresh_interpreter("trainer.task", ["--dataset", f"folder:{folder}", "--job-dir",
                                                        str(tmp_path / "job")])
    lines = result["err"].strip().splitlines()
    assert result["code"] == 1 and len(lines) == 1 and expected in lines[0], result["err"]
    assert result["heavy"] == []


@pytest.mark.parametrize("args, expected", [
    (["--dataset", "folder:x", "--image-size", "32y"], "expected SIDE or HEIGHTxWIDTH"),
    (["--dataset", "folder:x", "--image-size", "2"], "each side must be 4 to 1024"),
    (["--dataset", "mnist", "--image-size", "32"], "--image-size applies to --dataset folder:DIR only"),
    (["--dataset", "folder:x", "--no-flip", "--augment", "shift-flip"], "--no-flip contradicts"),
], ids=["syntax", "range", "not a folder", "flip contradiction"])
def test_bad_image_flags_exit_2_before_tensorflow(args, expected):
    result = main_in_fresh_interpreter("trainer.task", args)
    assert result["code"] == 2 and expected in result["err"], result["err"]
    assert result["heavy"] == []
