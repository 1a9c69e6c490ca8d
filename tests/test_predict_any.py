"""`trainer.predict` and the plots with models of any image shape, channels and class count: colour 32x32
with 10 classes, grey 28x28 with 47, colour 36x36 trained on resized files ("resize") with 4, grey 24x20 on a
light background with 2; metadata faults and signatures that disagree with the metadata.

The model folders are made here as an export makes them (a SavedModel whose `serving_default` has the
trainer's signature, class_names.json, training_images.json version 1 with the shape keys), but the models
are not trained: each answers the class whose prototype colour (or grey level) is nearest the mean of the
image it is given, so which class predict must name follows from the pixels it sends. Predict runs
in-process (`predict.main`, output captured at the file descriptors) on real PNG and JPEG files.
"""

import io
import json
import os
import shutil

import numpy as np
import pytest

CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_COLOURS = [(200, 200, 255), (220, 20, 20), (255, 255, 0), (128, 128, 128), (140, 90, 40), (255, 255, 255),
                 (20, 180, 20), (0, 0, 0), (20, 20, 220), (255, 128, 0)]
EMNIST = [str(d) for d in range(10)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)] + list("abdefghnqrt")
STEP_47 = 255 / 46  # the 47-class model's prototypes: grey levels 0, STEP_47, ..., 255
RESIZED = ["red thing", "green thing", "blue thing", "white thing"]
RESIZED_COLOURS = [(220, 20, 20), (20, 180, 20), (20, 20, 220), (255, 255, 255)]


def nearest(pixels, prototypes):
    """The class the test models answer for one input: the prototype nearest the image's mean colour."""
    pixels = np.asarray(pixels, np.float32)
    mean = pixels.reshape(-1, 1 if pixels.ndim == 2 else 3).mean(axis=0)
    return int(np.argmin(((np.asarray(prototypes, np.float32) - mean) ** 2).sum(axis=1)))


def save_model(folder, height, width, channels, prototypes):
    """A SavedModel with the trainer's serving signature for this shape and len(prototypes) classes."""
    import tensorflow as tf

    shape = [None, height, width] + ([3] if channels == 3 else [])
    module = tf.Module()
    module.prototypes = tf.Variable(np.asarray(prototypes, np.float32).reshape(len(prototypes), channels))

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.uint8, name="image")])
    def serve(image):
        pixels = tf.cast(image, tf.float32)
        if channels == 1:
            pixels = pixels[..., None]
        mean = tf.reduce_mean(pixels, axis=[1, 2])
        distance = tf.reduce_sum(tf.square(mean[:, None, :] - module.prototypes[None]), axis=-1)
        probabilities = tf.nn.softmax(-distance / 100.0)
        return {"classes": tf.argmax(probabilities, axis=1), "probabilities": probabilities}

    module.serve = serve
    tf.saved_model.save(module, folder, signatures={"serving_default": serve})


def write_metadata(folder, names, **described):
    with open(os.path.join(folder, "class_names.json"), "w") as handle:
        json.dump(names, handle)
    with open(os.path.join(folder, "training_images.json"), "w") as handle:
        json.dump({"version": 1, "background": "dark", "background_level": 0, "object_side": 20, "centring": "mass",
                   "mass_offset": 0.5, "box_offset": 0.8, "examples_described": 1000, "class_names": names,
                   **described}, handle)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: model folder}: colour (32x32x3, 10), emnist (28x28x1, 47), resized (36x36x3 "resize", 4), light
    (24x20x1, 2 classes, dark objects on a light background, box-centred), digits (28x28x1, 10, no shape keys)."""
    root = tmp_path_factory.mktemp("models")
    made = {}
    specs = {
        "colour": ((32, 32, 3), CIFAR_COLOURS, CIFAR,
                   dict(height=32, width=32, channels=3, preprocess="frame", object_side=32, centring="box",
                        background="light", background_level=140)),
        "emnist": ((28, 28, 1), [level * STEP_47 for level in range(47)], EMNIST,
                   dict(height=28, width=28, channels=1, preprocess="frame")),
        "resized": ((36, 36, 3), RESIZED_COLOURS, RESIZED,
                    dict(height=36, width=36, channels=3, preprocess="resize", object_side=36, centring="box",
                         background="light", background_level=200)),
        "light": ((24, 20, 1), [255 - 40, 255 - 120], ["cat", "dog"],
                  dict(height=24, width=20, channels=1, preprocess="frame", object_side=20, centring="box",
                       background="light", background_level=255)),
    }
    for name, ((height, width, channels), prototypes, names, described) in specs.items():
        folder = str(root / name)
        save_model(folder, height, width, channels, prototypes)
        write_metadata(folder, names, **described)
        made[name] = folder
    digits = str(root / "digits")  # as exported before the shape keys: no height, ..., no class_names
    save_model(digits, 28, 28, 1, [level * 255 / 9 for level in range(10)])
    with open(os.path.join(digits, "training_images.json"), "w") as handle:
        json.dump({"version": 1, "background": "dark", "background_level": 0, "object_side": 20,
                   "centring": "mass"}, handle)
    made["digits"] = digits
    return made


def save_image(path, pixels, **options):
    from PIL import Image

    Image.fromarray(np.asarray(pixels, np.uint8)).save(path, **options)
    return str(path)


def solid(height, width, colour):
    return np.broadcast_to(np.asarray(colour, np.uint8), (height, width, len(colour))).copy()


def predict_lines(capfd, model_dir, *paths, show=None, top=None):
    """`predict.main` in-process: (exit code, [stdout split at tabs, per line], stderr)."""
    from trainer import predict

    capfd.readouterr()
    options = [*(["--show", show] if show else []), *(["--top", str(top)] if top else [])]
    code = predict.main(["--model-dir", model_dir, *options, *map(str, paths)])
    out, err = capfd.readouterr()
    return code, [line.split("\t") for line in out.splitlines()], err


def label(names, index):
    return f"{index} ({names[index]})" if names[index] != str(index) else str(index)


# ------------------------------------------------------------------------------------- colour models

def test_a_colour_model_names_the_colour_of_pngs_jpegs_and_grey_images_of_any_size(models, tmp_path, capfd):
    """Red, blue and grey images of other sizes, PNG and JPEG, a grey one among them: each resized whole to
    32x32x3 (no framing, a uniform image is no blank) and named with the model's classes."""
    from trainer.images import to_model_pixels
    from trainer.model_folder import read_training_images
    from trainer.predict import image_to_rgb, load_image, open_image

    red = save_image(tmp_path / "red.png", solid(40, 50, (220, 20, 20)))
    blue = save_image(tmp_path / "blue.jpg", solid(70, 100, (20, 20, 220)), quality=90)
    grey = save_image(tmp_path / "grey.png", np.full((20, 20), 128, np.uint8))
    code, lines, err = predict_lines(capfd, models["colour"], red, blue, grey)
    assert code == 0 and err == "", err
    assert [line[:2] for line in lines] == [[red, "1 (automobile)"], [blue, "8 (ship)"], [grey, "3 (cat)"]]
    assert all(0.5 < float(line[2]) <= 1 for line in lines), lines

    training = read_training_images(models["colour"], "colour")
    assert (training.height, training.width, training.channels) == (32, 32, 3)
    for path in (red, blue, grey):
        seen = load_image(path, training)
        assert seen.shape == (32, 32, 3) and seen.dtype == np.uint8
        np.testing.assert_array_equal(seen, to_model_pixels(image_to_rgb(open_image(path)), 32, 32, 3))


def test_a_colour_model_sees_the_picture_not_an_object_cut_out(models, tmp_path):
    """A photo-like picture (a red half, a blue half, 3:2) keeps both halves at 32x32: resized whole, the
    aspect not kept, as the folder reader makes its training images."""
    from trainer.model_folder import read_training_images
    from trainer.predict import load_image

    picture = np.concatenate([solid(60, 45, (220, 20, 20)), solid(60, 45, (20, 20, 220))], axis=1)
    seen = load_image(save_image(tmp_path / "halves.png", picture), read_training_images(models["colour"], "m"))
    assert seen.shape == (32, 32, 3)
    np.testing.assert_array_equal(seen[:, :15], solid(32, 15, (220, 20, 20)))
    np.testing.assert_array_equal(seen[:, 17:], solid(32, 15, (20, 20, 220)))


def test_a_resize_model_resizes_every_image_whole(models, tmp_path, capfd):
    from trainer.images import to_model_pixels
    from trainer.model_folder import read_training_images
    from trainer.predict import image_to_rgb, load_image, open_image

    green = save_image(tmp_path / "green.jpg", solid(80, 120, (20, 180, 20)), quality=85)
    light = save_image(tmp_path / "light.png", np.full((36, 36), 235, np.uint8))  # grey, at the model's size
    code, lines, err = predict_lines(capfd, models["resized"], green, light)
    assert code == 0 and err == "", err
    assert [line[1] for line in lines] == ["1 (green thing)", "3 (white thing)"]
    training = read_training_images(models["resized"], "m")
    for path in (green, light):
        np.testing.assert_array_equal(load_image(path, training),
                                      to_model_pixels(image_to_rgb(open_image(path)), 36, 36, 3))


def test_show_draws_colour_inputs_in_colour_at_the_models_size(models, tmp_path, capfd):
    from PIL import Image

    from trainer.model_folder import read_training_images
    from trainer.predict import load_image

    paths = [save_image(tmp_path / f"{name}.png", solid(30, 45, colour))
             for name, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220)), ("green", (20, 180, 20)))]
    sheet = str(tmp_path / "seen.png")
    code, lines, err = predict_lines(capfd, models["resized"], *paths, show=sheet)
    assert code == 0 and err == "", err
    seen = Image.open(sheet)
    zoom, tile = 3, 36 * 3  # 36 pixels zoomed by the whole factor nearest 112 / 36
    assert seen.mode == "RGB" and seen.size == (3 * (tile + 4) + 4, tile + 14 + 4 + 4), seen.size
    pixels = np.asarray(seen)
    training = read_training_images(models["resized"], "m")
    for number, path in enumerate(paths):
        left = 4 + number * (tile + 4)
        np.testing.assert_array_equal(pixels[4:4 + tile:zoom, left:left + tile:zoom], load_image(path, training))


# ---------------------------------------------------------------------------------- grey framed models

def test_a_47_class_grey_model_names_its_classes(models, tmp_path, capfd):
    """A 28x28 image like EMNIST's goes to the model unchanged; a black-on-white drawing of another size is
    cleaned up and framed at 28x28 as MNIST-style letters are; both named among 47 classes."""
    from PIL import Image, ImageDraw

    from trainer.model_folder import read_training_images
    from trainer.predict import load_image

    like_training = np.zeros((28, 28), np.uint8)
    like_training[6:22, 6:22] = 255  # mean 83.3: level 15 of 47, "F"
    as_trained = save_image(tmp_path / "square.png", like_training)
    drawing = Image.new("RGB", (90, 60), "white")
    ImageDraw.Draw(drawing).ellipse((30, 10, 60, 50), outline="black", width=5)
    drawn = str(tmp_path / "ring.jpg")
    drawing.save(drawn, quality=95)

    training = read_training_images(models["emnist"], "m")
    np.testing.assert_array_equal(load_image(as_trained, training), like_training)
    framed = load_image(drawn, training)
    rows, cols = np.flatnonzero(framed.max(axis=1) > 25), np.flatnonzero(framed.max(axis=0) > 25)
    assert framed.shape == (28, 28) and max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 <= 20

    prototypes = [[level * STEP_47] for level in range(47)]
    expected = [nearest(like_training, prototypes), nearest(framed, prototypes)]
    assert expected[0] == 15
    code, lines, err = predict_lines(capfd, models["emnist"], as_trained, drawn)
    assert code == 0 and err == "", err
    assert [line[1] for line in lines] == [label(EMNIST, index) for index in expected], lines


def test_top_lists_the_most_probable_classes_of_47_and_of_2(models, tmp_path, capfd):
    """--top 4 on the 47-class model: the nearest four grey levels, most probable first; on a 2-class model
    --top 4 gives both classes; --top 0 is a command-line error."""
    from trainer import predict

    square = np.zeros((28, 28), np.uint8)
    square[6:22, 6:22] = 255
    path = save_image(tmp_path / "square.png", square)
    code, lines, err = predict_lines(capfd, models["emnist"], path, top=4)
    assert code == 0 and err == "", err
    (shown, *pairs), = lines
    distances = [(square.mean() - level * STEP_47) ** 2 for level in range(47)]
    assert pairs[0::2] == [label(EMNIST, index) for index in np.argsort(distances)[:4]] == \
        ["15 (F)", "16 (G)", "14 (E)", "17 (H)"]
    probabilities = [float(value) for value in pairs[1::2]]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0001

    bar = np.full((24, 20), 255, np.uint8)
    bar[4:20, 2:18] = 30
    code, lines, err = predict_lines(capfd, models["light"], save_image(tmp_path / "bar.png", bar), top=4)
    assert code == 0 and err == "", err
    assert sorted(lines[0][1::2]) == ["0 (cat)", "1 (dog)"]
    assert abs(float(lines[0][2]) + float(lines[0][4]) - 1) < 1e-3

    with pytest.raises(SystemExit) as exit_:
        predict.main(["--model-dir", models["light"], "--top", "0", path])
    assert exit_.value.code == 2
    assert "argument --top: 0 is not 1 or more" in capfd.readouterr().err


def test_a_two_class_model_of_24x20_frames_on_a_light_background(models, tmp_path, capfd):
    """Not square, dark on light, two classes: an image at 20 wide and 24 high like the training images goes
    unchanged; a larger one is framed into 24x20, its object's box filling the frame's width, light around it."""
    from trainer.model_folder import read_training_images
    from trainer.predict import load_image

    training = read_training_images(models["light"], "m")
    like_training = np.full((24, 20), 255, np.uint8)
    like_training[4:20, 2:18] = 30
    as_trained = save_image(tmp_path / "dark_square.png", like_training)
    big = np.full((120, 160), 250, np.uint8)
    big[40:80, 40:120] = 60  # a wide dark bar
    bar = save_image(tmp_path / "bar.png", big)
    np.testing.assert_array_equal(load_image(as_trained, training), like_training)
    framed = load_image(bar, training)
    assert framed.shape == (24, 20)
    dark = framed < 128
    rows, cols = np.flatnonzero(dark.any(axis=1)), np.flatnonzero(dark.any(axis=0))
    assert cols[0] == 0 and cols[-1] == 19 and 8 <= rows[-1] - rows[0] + 1 <= 12, (rows, cols)
    assert framed[0].min() == 255 and framed[-1].min() == 255  # above and below the bar: the light background

    prototypes = [[255 - 40], [255 - 120]]
    code, lines, err = predict_lines(capfd, models["light"], as_trained, bar)
    assert code == 0 and err == "", err
    assert [line[1] for line in lines] == [label(["cat", "dog"], nearest(pixels, prototypes))
                                           for pixels in (like_training, framed)]
    assert {line[1] for line in lines} <= {"0 (cat)", "1 (dog)"}


def test_a_folder_without_the_shape_keys_is_a_28x28_ten_class_model(models, tmp_path, capfd):
    """As exported before the keys: no class_names.json gives the digits' names; 28x28 in, 10 classes."""
    from trainer.model_folder import read_training_images

    training = read_training_images(models["digits"], "m")
    assert (training.height, training.width, training.channels, training.class_names, training.preprocess) == \
        (28, 28, 1, None, "frame")
    digit = np.zeros((28, 28), np.uint8)
    digit[4:24, 12:16] = 255  # a "1", mean 26: level 1 of 10
    path = save_image(tmp_path / "one.png", digit)
    code, lines, err = predict_lines(capfd, models["digits"], path)
    assert code == 0 and err == "", err
    assert lines[0][1] == "1"


# ------------------------------------------------------------------------------------ metadata faults

def edited(models, tmp_path, name, training=None, class_names=None):
    """A copy of model `name` with training_images.json's keys changed (None removes one) and/or
    class_names.json replaced."""
    folder = str(tmp_path / f"{name}-copy")
    shutil.copytree(models[name], folder)
    path = os.path.join(folder, "training_images.json")
    with open(path) as handle:
        described = json.load(handle)
    described.update(training or {})
    with open(path, "w") as handle:
        json.dump({key: value for key, value in described.items() if value is not None}, handle)
    if class_names is not None:
        with open(os.path.join(folder, "class_names.json"), "w") as handle:
            json.dump(class_names, handle)
    return folder


METADATA_FAULTS = [
    (dict(channels=4), "training_images.json: channels is 4, not 1 or 3"),
    (dict(channels="3"), 'training_images.json: channels is "3", not 1 or 3'),
    (dict(channels=3.0), "training_images.json: channels is 3.0, not 1 or 3"),
    (dict(height=0), "training_images.json: height is 0, not a whole number from 1 to 4096"),
    (dict(width=5000), "training_images.json: width is 5000, not a whole number from 1 to 4096"),
    (dict(width=32.5), "training_images.json: width is 32.5, not a whole number from 1 to 4096"),
    (dict(height=True), "training_images.json: height is true, not a whole number from 1 to 4096"),
    (dict(preprocess="crop"), 'training_images.json: preprocess is "crop", not "resize" or "frame"'),
    (dict(object_side=40), "training_images.json: object_side is 40, not a whole number from 1 to 32"),
    (dict(class_names="cats"), "training_images.json: class_names is a string, not a list of at least 2 names"),
    (dict(class_names=["cat"]), "training_images.json: class_names is 1 name, not a list of at least 2 names"),
    (dict(class_names=["cat", " "]), "training_images.json: class_names: name 2 is an empty string, not a name"),
    (dict(class_names=["cat", 7]), "training_images.json: class_names: name 2 is a number, not a name"),
]


@pytest.mark.parametrize("changes, expected", METADATA_FAULTS, ids=[row[1].split(": ")[1] for row in METADATA_FAULTS])
def test_bad_metadata_is_one_line_naming_the_file_and_key(models, tmp_path, capfd, changes, expected):
    folder = edited(models, tmp_path, "colour", training=changes)
    image = save_image(tmp_path / "red.png", solid(10, 10, (220, 20, 20)))
    code, lines, err = predict_lines(capfd, folder, image)
    assert code == 1 and lines == [] and err == f"error: --model-dir {folder}: {expected}\n", err


@pytest.mark.parametrize("names, expected", [
    (CIFAR[:9], "class_names.json holds 9 names, not a list of 10 names (as training_images.json's class_names)"),
    (["airplane", "car", *CIFAR[2:]],
     'class_names.json: name 2 is "car", but training_images.json\'s class_names has "automobile"'),
    ({"0": "airplane"}, "class_names.json holds an object, not a list of 10 names"),
])
def test_class_names_that_disagree_with_the_metadata_are_one_line(models, tmp_path, capfd, names, expected):
    folder = edited(models, tmp_path, "colour", class_names=names)
    image = save_image(tmp_path / "red.png", solid(10, 10, (220, 20, 20)))
    code, lines, err = predict_lines(capfd, folder, image)
    assert code == 1 and lines == [] and err == f"error: --model-dir {folder}: {expected}\n", err


def test_without_class_names_json_the_recorded_names_are_used(models, tmp_path, capfd):
    folder = edited(models, tmp_path, "colour")
    os.remove(os.path.join(folder, "class_names.json"))
    code, lines, err = predict_lines(capfd, folder, save_image(tmp_path / "blue.png", solid(9, 9, (20, 20, 220))))
    assert code == 0 and err == "" and lines[0][1] == "8 (ship)", (lines, err)


def red_object(tmp_path):
    """A red square on light grey: an object a grey framed model finds too (a uniform image would be blank)."""
    picture = solid(40, 40, (230, 230, 230))
    picture[10:30, 12:28] = (220, 20, 20)
    return save_image(tmp_path / "red_object.png", picture)


MIXED = (", the shape and classes training_images.json records (is saved_model.pb from another export? Export "
         "the model again)")


@pytest.mark.parametrize("changes, expected", [
    (dict(height=36, width=36, object_side=36),
     "saved_model.pb is not a model exported by this trainer: its serving_default maps image uint8 [?,32,32,3] -> "
     "classes int64 [?], probabilities float32 [?,10], not image uint8 [?,36,36,3] -> classes int64 [?], "
     "probabilities float32 [?,10]" + MIXED),
    (dict(channels=1),
     "saved_model.pb is not a model exported by this trainer: its serving_default maps image uint8 [?,32,32,3] -> "
     "classes int64 [?], probabilities float32 [?,10], not image uint8 [?,32,32] -> classes int64 [?], "
     "probabilities float32 [?,10]" + MIXED),
    (dict(class_names=RESIZED),
     "saved_model.pb is not a model exported by this trainer: its serving_default maps image uint8 [?,32,32,3] -> "
     "classes int64 [?], probabilities float32 [?,10], not image uint8 [?,32,32,3] -> classes int64 [?], "
     "probabilities float32 [?,4]" + MIXED),
])
def test_a_signature_that_disagrees_with_the_metadata_is_one_line(models, tmp_path, capfd, changes, expected):
    names = changes.get("class_names")
    folder = edited(models, tmp_path, "colour", training=changes, class_names=names)
    image = red_object(tmp_path)
    code, lines, err = predict_lines(capfd, folder, image)
    assert code == 1 and lines == [] and err == f"error: --model-dir {folder}: {expected}\n", err


def test_a_folder_without_shape_keys_holding_a_colour_model_is_named_foreign(models, tmp_path, capfd):
    """The shape keys removed from a colour model's metadata: the folder claims MNIST's form, and the message
    shows the signature and the one expected, as for any other model."""
    folder = edited(models, tmp_path, "colour", training=dict(height=None, width=None, channels=None,
                                                              class_names=None, object_side=20))
    image = red_object(tmp_path)
    code, lines, err = predict_lines(capfd, folder, image)
    assert code == 1 and lines == []
    assert err == (f"error: --model-dir {folder}: saved_model.pb is not a model exported by this trainer: its "
                   "serving_default maps image uint8 [?,32,32,3] -> classes int64 [?], probabilities float32 [?,10], "
                   "not image uint8 [?,28,28] -> classes int64 [?], probabilities float32 [?,10]\n"), err


# ------------------------------------------------------------------------------------------- plots

def png_image(data):
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def tick_labels_overlap(figure):
    """Whether any two neighbouring tick labels of the figure's first axes overlap (x among x, y among y);
    labels turned by other than a right angle are skipped (their boxes overlap, the words do not)."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    axes = figure.axes[0]
    for labels in (axes.get_xticklabels(), axes.get_yticklabels()):
        boxes = [label.get_window_extent(renderer) for label in labels
                 if label.get_text() and label.get_rotation() % 90 == 0]
        if any(a.overlaps(b) for a, b in zip(boxes, boxes[1:], strict=False)):
            return True
    return False


def test_the_confusion_matrix_is_readable_at_47_classes_with_long_names():
    import matplotlib.pyplot as plt

    from trainer import plots

    names = [f"{name} (class number {i})" for i, name in enumerate(EMNIST)]  # 19 to 20 characters
    names[5] = "a very long class name that goes on and on"
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 47, 2000)
    predictions = np.where(rng.random(2000) < 0.8, labels, rng.integers(0, 47, 2000))
    matrix = plots.confusion_matrix(labels, predictions, 47)
    figure = plots.confusion_figure(matrix, names, "47 classes")
    try:
        width, height = figure.get_size_inches()
        assert 12 <= width <= plots.MAX_FIGURE_INCHES and height <= plots.MAX_FIGURE_INCHES
        axes = figure.axes[0]
        assert len(axes.texts) == 0  # no per-cell counts
        sizes = {label.get_fontsize() for label in axes.get_xticklabels() + axes.get_yticklabels()}
        assert sizes and max(sizes) <= 9 and min(sizes) >= 5, sizes
        assert {label.get_rotation() for label in axes.get_xticklabels()} == {90}
        assert max(len(label.get_text()) for label in axes.get_xticklabels()) == plots.NAME_CHARS
        assert not tick_labels_overlap(figure)
    finally:
        plt.close(figure)
    image = png_image(plots.confusion_png(matrix, names, "47 classes"))
    assert 1200 <= image.size[0] <= 2000 and 1200 <= image.size[1] <= 2000, image.size


def test_the_confusion_matrix_at_10_and_2_classes():
    """10 classes as before (8x7 inches, 11 pt labels, every count written); 2 classes the same layout."""
    import matplotlib.pyplot as plt

    from trainer import plots

    for names in (list("0123456789"), ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                       "Sneaker", "Bag", "Ankle boot"], ["cat", "dog"]):
        classes = len(names)
        labels = np.arange(200) % classes
        matrix = plots.confusion_matrix(labels, (labels + (np.arange(200) % 7 == 0)) % classes, classes)
        figure = plots.confusion_figure(matrix, names, "test")
        try:
            axes = figure.axes[0]
            assert tuple(figure.get_size_inches()) == (8.0, 7.0)
            assert len(axes.texts) == classes * classes
            assert [text.get_text() for text in axes.texts] == [str(count) for count in matrix.ravel()]
            assert {label.get_fontsize() for label in axes.get_xticklabels()} == {11.0}
            assert not tick_labels_overlap(figure)
        finally:
            plt.close(figure)
        assert png_image(plots.confusion_png(matrix, names, "test")).size[0] < 1000


def test_misclassified_images_of_any_size_in_colour():
    """RGB 32x32 shown in colour, with long class names cut to fit; grey 36x20 shown grey."""
    from trainer import plots

    rng = np.random.default_rng(1)
    colour = np.zeros((12, 32, 32, 3), np.uint8)
    colour[..., 0] = 230  # red images
    labels = np.arange(12) % 10
    names = [f"a rather long name for class {i}" for i in range(10)]
    image = png_image(plots.misclassified_png(colour, labels, (labels + 1) % 10, names))
    pixels = np.asarray(image.convert("RGB")).astype(int)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    assert red.sum() > 12 * 50 * 50, red.sum()  # twelve red tiles, each far larger than 50x50 pixels
    assert image.size[0] < 1200 and image.size[1] < 1000, image.size

    grey = rng.integers(0, 256, (7, 36, 20), dtype=np.uint8)
    image = png_image(plots.misclassified_png(grey, np.zeros(7, int), np.ones(7, int), ["cat", "dog"]))
    pixels = np.asarray(image.convert("RGB")).astype(int)
    assert np.abs(pixels[..., 0] - pixels[..., 2]).max() < 40  # grey (and the black title): no colour
