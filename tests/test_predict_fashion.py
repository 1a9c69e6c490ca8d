"""`trainer.predict` with models trained on other images than digits: the export's training_images.json says
how the training images are made (background, the object's size in the frame, its centring) and predict
brings each image to that form. Images like the training data (28x28 grey, same polarity) go to the model
unchanged; others are cleaned up and framed as the training images are; a model folder without the file is
a digit model, read as before.

Real Fashion-MNIST files (Debian's dataset-fashion-mnist) and a real training run on them (in-process, through
`trainer.task.main`); the preprocessing tests need no TensorFlow.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT_DIR, run_task, trainer_env

TEST_IMAGES = 300


@pytest.fixture(scope="module")
def fashion(fashion_dir):
    """Fashion-MNIST's arrays: {train_images, train_labels, test_images, test_labels}."""
    from trainer.data import load_idx_folder

    return load_idx_folder(fashion_dir)


@pytest.fixture(scope="module")
def fashion_training():
    from trainer.model_folder import TrainingImages

    return TrainingImages(background="dark", background_level=0, object_side=28, centring="box")


@pytest.fixture(scope="module")
def fashion_run(fashion_dir, tmp_path_factory):
    """A 2-epoch run of the default recipe on 10,000 Fashion-MNIST examples; returns its job dir."""
    job_dir = str(tmp_path_factory.mktemp("fashion_run") / "job")
    code, _, err = run_task(["--dataset", f"idx:{fashion_dir}", "--train-limit", "10000", "--epochs", "2",
                             "--job-dir", job_dir])
    assert code == 0, err
    return job_dir


def correlation(a, b):
    return float(np.corrcoef(np.ravel(a).astype(float), np.ravel(b).astype(float))[0, 1])


def object_box(pixels):
    """(height, width, centre row, centre column) of the pixels at least a tenth of the brightest."""
    mask = pixels > 0.1 * pixels.max()
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1, (rows[0] + rows[-1]) / 2, (cols[0] + cols[-1]) / 2


def write_placed(path, image):
    """The image 3x larger, dark on white, off-centre on a 200x150 page: a scan, not like the training data."""
    from PIL import Image

    page = Image.new("L", (200, 150), 255)
    page.paste(Image.fromarray(255 - image).resize((84, 84), Image.Resampling.BILINEAR), (100, 40))
    page.convert("RGB").save(path)


# ------------------------------------------------------------------------ the description, no TensorFlow

def test_the_training_images_are_described_by_their_statistics(fashion, digits):
    from trainer.images import describe_images

    garments = describe_images(fashion["train_images"])
    assert (garments["background"], garments["background_level"], garments["object_side"], garments["centring"]) \
        == ("dark", 0, 28, "box"), garments
    numbers = describe_images(digits[0])
    assert (numbers["background"], numbers["object_side"], numbers["centring"]) == ("dark", 20, "mass"), numbers
    inverted = describe_images(255 - digits[0])
    assert (inverted["background"], inverted["background_level"]) == ("light", 255), inverted


def test_images_like_the_training_data_go_to_the_model_unchanged(fashion, fashion_training, tmp_path):
    """28x28 grey PNGs, the same as RGB with equal channels and as grey with an opaque alpha channel."""
    from PIL import Image

    from trainer.predict import load_image

    for i, image in enumerate(fashion["test_images"][:20]):
        forms = {"L": Image.fromarray(image), "RGB": Image.fromarray(image).convert("RGB"),
                 "LA": Image.fromarray(image).convert("LA")}
        for mode, form in forms.items():
            path = str(tmp_path / f"{i}_{mode}.png")
            form.save(path)
            np.testing.assert_array_equal(load_image(path, fashion_training), image, err_msg=path)


def test_no_real_garment_is_blank(fashion, fashion_training):
    """Every one of the 10,000 test garments, as a 28x28 image, goes to the model as it is; only an image with
    nothing on it is blank."""
    from PIL import Image

    from trainer.predict.cleanup import Blank
    from trainer.predict.preprocess import as_trained
    from trainer.predict.reading import image_to_rgb

    for image in fashion["test_images"]:
        picture = Image.fromarray(image)
        assert as_trained(picture, image_to_rgb(picture), fashion_training) is not None
    empty = Image.new("L", (28, 28), 0)
    with pytest.raises(Blank, match="nothing to classify: the image is blank or a single colour"):
        as_trained(empty, image_to_rgb(empty), fashion_training)


def test_other_images_are_cleaned_up_and_framed_as_the_training_images(fashion, fashion_training, tmp_path):
    """A garment scanned dark on white, off-centre: for a garment model it fills the frame, box centred, white
    on black like the training garments (read as a digit, 20x20 by mass, it resembles them far less); for a
    digit model it fits 20x20 as MNIST's digits do."""
    from trainer.model_folder import TrainingImages
    from trainer.predict import load_image

    digits = TrainingImages(background="dark", background_level=0, object_side=20, centring="mass")
    similar, as_digit = [], []
    for i in (0, 1, 2, 5, 8):  # an ankle boot, a pullover, trousers, more trousers, a sandal
        image = fashion["test_images"][i]
        path = str(tmp_path / f"placed_{i}.png")
        write_placed(path, image)
        seen = load_image(path, fashion_training)
        height, width, row, col = object_box(seen)
        assert max(height, width) == 28 and abs(row - 13.5) <= 1 and abs(col - 13.5) <= 1, (i, object_box(seen))
        similar.append(correlation(seen, image))
        as_digit.append(correlation(load_image(path, None), image))
        assert max(object_box(load_image(path, digits))[:2]) <= 20
    # measured 0.98, 0.93, 0.93, 0.93, 0.85 (the sandal's thin straps blur in the 3x scan); as digits 0.32-0.68
    assert np.median(similar) > 0.9 and min(similar) > 0.8, np.round(similar, 3)
    assert all(np.array(similar) > np.array(as_digit) + 0.15), (np.round(similar, 3), np.round(as_digit, 3))


def test_a_model_without_training_images_reads_every_image_as_a_digit(fashion, tmp_path):
    """A 28x28 image is cleaned up and re-framed (20x20 by mass), as for a model exported before the file."""
    from PIL import Image

    from trainer.predict import load_image, to_mnist

    image = fashion["test_images"][0]
    path = str(tmp_path / "garment.png")
    Image.fromarray(image).save(path)
    seen = load_image(path, None)
    np.testing.assert_array_equal(seen, to_mnist(Image.fromarray(image)))
    assert max(object_box(seen)[:2]) == 20


# ------------------------------------------------------------------------------------ the command

@pytest.mark.slow
def test_fashion_pngs_are_read_as_the_serving_signature_reads_their_arrays(fashion_run, fashion, tmp_path):
    """The first 300 test garments as 28x28 PNGs: predict's accuracy within 2 points of the serving
    signature's on the same arrays; a copy of the model without training_images.json (read as a digit model)
    falls far behind, so the bar measures the description's use."""
    import tensorflow as tf
    from PIL import Image

    model_dir = os.path.join(fashion_run, "model")
    with open(os.path.join(model_dir, "training_images.json")) as handle:
        described = json.load(handle)
    with open(os.path.join(model_dir, "class_names.json")) as handle:
        names = json.load(handle)
    assert names[9] == "Ankle boot", names
    assert (described["object_side"], described["centring"]) == (28, "box"), described
    images, labels = fashion["test_images"][:TEST_IMAGES], fashion["test_labels"][:TEST_IMAGES]
    served = tf.saved_model.load(model_dir).signatures["serving_default"](image=tf.constant(images))
    serving_accuracy = float((served["classes"].numpy() == labels).mean())
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"{i:03d}.png"))
        Image.fromarray(image).save(paths[-1])
    digit_model = str(tmp_path / "digit-model")
    shutil.copytree(model_dir, digit_model, ignore=shutil.ignore_patterns("training_images.json"))

    accuracy = {}
    for name, folder in (("described", model_dir), ("digit", digit_model)):
        result = subprocess.run([sys.executable, "-m", "trainer.predict", "--model-dir", folder, *paths],
                                cwd=ROOT_DIR, env=trainer_env(), capture_output=True, text=True, timeout=600)
        lines = result.stdout.splitlines()
        predicted = {line.split("\t")[0]: int(line.split("\t")[1].split()[0]) for line in lines}
        answers = np.array([predicted.get(path, -1) for path in paths])
        accuracy[name] = float((answers == labels).mean())
        if name == "described":
            assert result.returncode == 0 and result.stderr == "", result.stderr
            first = predicted[paths[0]]
            assert lines[0].split("\t")[1] == f"{first} ({names[first]})", lines[0]
    assert abs(accuracy["described"] - serving_accuracy) <= 0.02, (accuracy, serving_accuracy)
    assert serving_accuracy > 0.75 and accuracy["digit"] < serving_accuracy - 0.2, (accuracy, serving_accuracy)
