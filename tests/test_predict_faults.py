"""`trainer.predict` on damaged model folders: each is one `error:` line naming the file at fault, exit 1.

Every case corrupts its own copy of the session's seed run model (conftest.py) and calls `predict.main`
in-process with file-descriptor capture, so TensorFlow's own C++ lines would be seen too; two cases run as
real processes, where TensorFlow's start-up chatter on stderr is also counted.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from helpers import ROOT_DIR, trainer_env

DATA = "variables/variables.data-00000-of-00001"
INDEX = "variables/variables.index"


def overwrite(name, content):
    def corrupt(model):
        with open(os.path.join(model, name), "wb") as handle:
            handle.write(content if isinstance(content, bytes) else json.dumps(content).encode())
    return corrupt


def truncate(name):
    def corrupt(model):
        path = os.path.join(model, name)
        os.truncate(path, os.path.getsize(path) // 2)
    return corrupt


def delete(name):
    def corrupt(model):
        path = os.path.join(model, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return corrupt


def garble(name):
    """Same length, other bytes: only a checksum or a parser can tell."""
    def corrupt(model):
        path = os.path.join(model, name)
        with open(path, "wb") as handle:
            handle.write(os.urandom(os.path.getsize(path)) if os.path.getsize(path) else b"\x01")
    return corrupt


def foreign_saved_model(kind):
    """Replace saved_model.pb and variables/ by those of another SavedModel: `kind` says which."""
    def corrupt(model):
        import tensorflow as tf

        other = model + "-other"
        module = tf.Module()
        module.weight = tf.Variable(1.0)
        if kind == "no signature":  # a Module with weights only
            pass
        elif kind == "float input":
            module.f = tf.function(lambda x: {"y": x * module.weight},
                                   input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
        else:  # the trainer's input and outputs, but five classes
            module.f = tf.function(lambda image: {"classes": tf.zeros_like(image[:, 0, 0], tf.int64),
                                                  "probabilities": tf.fill([tf.shape(image)[0], 5], 0.2)},
                                   input_signature=[tf.TensorSpec([None, 28, 28], tf.uint8, name="image")])
        tf.saved_model.save(module, other, signatures=getattr(module, "f", None))
        for name in ("saved_model.pb", "variables", "fingerprint.pb"):
            delete(name)(model)
            shutil.move(os.path.join(other, name), os.path.join(model, name))
    return corrupt


def variables_of_another_model(model):
    """The weights of a model with another shape (same files, all whole)."""
    import keras

    other = model + "-other"
    keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)]).export(
        other, verbose=False)
    delete("variables")(model)
    shutil.move(os.path.join(other, "variables"), os.path.join(model, "variables"))


def variables_replaced_by(kind):
    """variables/ made unreadable without permissions (the tests may run as root, who reads anything): a file,
    a symbolic link to itself, or one to a path through a regular file."""
    def corrupt(model):
        path = os.path.join(model, "variables")
        shutil.rmtree(path)
        if kind == "a file":
            with open(path, "w") as handle:
                handle.write("not a folder")
        elif kind == "a link loop":
            os.symlink("variables", path)
        else:
            os.symlink(os.path.join("saved_model.pb", "variables"), path)
    return corrupt


def training_images(**changes):
    """training_images.json with some keys changed (None removes one)."""
    def corrupt(model):
        path = os.path.join(model, "training_images.json")
        with open(path) as handle:
            described = json.load(handle)
        described.update(changes)
        overwrite("training_images.json", {key: value for key, value in described.items() if value is not None})(model)
    return corrupt


# (case, corruption of a copy of the model, what the one error line must say after "--model-dir DIR: ")
CASES = [
    ("saved_model.pb garbage", garble("saved_model.pb"), "saved_model.pb is damaged or not a SavedModel"),
    ("saved_model.pb text", overwrite("saved_model.pb", b"not a model\n"),
     "saved_model.pb is damaged or not a SavedModel"),
    ("saved_model.pb truncated", truncate("saved_model.pb"), "saved_model.pb is damaged or not a SavedModel"),
    ("saved_model.pb empty", overwrite("saved_model.pb", b""), "saved_model.pb is empty (0 bytes)"),
    ("saved_model.pb missing", delete("saved_model.pb"), "no saved_model.pb there"),
    ("variables missing", delete("variables"), "variables/ is missing"),
    ("variables a file", variables_replaced_by("a file"), "variables is a file, not the folder of the model's weights"),
    ("variables a link loop", variables_replaced_by("a link loop"),
     "cannot read variables/ (Too many levels of symbolic links)"),
    ("variables through a file", variables_replaced_by("through a file"), "cannot read variables/ (Not a directory)"),
    ("data truncated", truncate(DATA), f"{DATA} is damaged or truncated"),
    ("data empty", overwrite(DATA, b""), f"{DATA} is empty (0 bytes)"),
    ("data garbage", garble(DATA), f"{DATA} is damaged or truncated"),
    ("data missing", delete(DATA), f"{DATA} is missing"),
    ("index garbage", garble(INDEX), f"{INDEX} is damaged"),
    ("index missing", delete(INDEX), f"{INDEX} is missing"),
    ("fingerprint garbage", garble("fingerprint.pb"), "fingerprint.pb is damaged"),
    ("class names not JSON", overwrite("class_names.json", b'["a", "b"'), "class_names.json is not valid JSON"),
    ("class names not UTF-8", overwrite("class_names.json", b"\xff\xfe[]"), "class_names.json is not UTF-8"),
    ("class names a dict", overwrite("class_names.json", {"0": "zero"}),
     "class_names.json holds an object, not a list of 10 names"),
    ("class names nine", overwrite("class_names.json", list("abcdefghi")),
     "class_names.json holds 9 names, not a list of 10 names"),
    ("class names numbers", overwrite("class_names.json", list(range(10))),
     "class_names.json: name 1 is a number"),
    ("class names a folder", lambda model: delete("class_names.json")(model) or
     os.mkdir(os.path.join(model, "class_names.json")), "class_names.json is a folder"),
    ("training images not JSON", overwrite("training_images.json", b'{"version": 1,'),
     "training_images.json is not valid JSON"),
    ("training images a list", overwrite("training_images.json", [1]),
     "training_images.json holds a list, not an object"),
    ("training images a later version", training_images(version=2),
     "training_images.json is version 2, not 1: written by another release of the trainer"),
    ("training images grey background", training_images(background="grey"),
     'training_images.json: background is "grey", not "dark" or "light"'),
    ("training images no centring", training_images(centring=None),
     'training_images.json: centring is null, not "mass" or "box"'),
    ("training images object too big", training_images(object_side=40),
     "training_images.json: object_side is 40, not a whole number from 1 to 28"),
    ("another model's signature", foreign_saved_model("float input"),
     "saved_model.pb is not a model exported by this trainer: its serving_default maps x float32 [?,3] -> "),
    ("no signature", foreign_saved_model("no signature"),
     "saved_model.pb is not a model exported by this trainer: it has no serving_default signature"),
    ("five classes", foreign_saved_model("five classes"),
     "saved_model.pb is not a model exported by this trainer: its serving_default maps image uint8 [?,28,28] -> "
     "classes int64 [?], probabilities float32 [?,5], not "),
    ("variables of another model", variables_of_another_model,
     "TensorFlow cannot restore variables/ into saved_model.pb's graph"),
]


@pytest.fixture
def model_copy(seed_run, tmp_path):
    model = str(tmp_path / "model")
    shutil.copytree(os.path.join(seed_run[0], "model"), model)
    return model


@pytest.fixture(scope="module")
def digit_png(digits, tmp_path_factory):
    from PIL import Image

    path = str(tmp_path_factory.mktemp("digit") / "digit.png")
    Image.fromarray(255 - digits[0][4000]).save(path)
    return path


def predict_in_process(capfd, model_dir, *images):
    """`predict.main` with stdout and stderr captured at the file descriptors: (exit code, out, err, seconds)."""
    from trainer import predict

    started = time.perf_counter()
    code = predict.main(["--model-dir", model_dir, *images])
    seconds = time.perf_counter() - started
    out, err = capfd.readouterr()
    return code, out, err, seconds


def assert_one_error_line(code, out, err, expected):
    assert code == 1, (code, out, err)
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: --model-dir ") and expected in err, err
    assert "Traceback" not in err and "http" not in err


@pytest.mark.parametrize("case, corrupt, expected", CASES, ids=[case[0] for case in CASES])
def test_a_damaged_model_folder_is_one_line_naming_the_file(model_copy, digit_png, capfd, case, corrupt, expected):
    corrupt(model_copy)
    capfd.readouterr()  # whatever making the corruption printed
    code, out, err, seconds = predict_in_process(capfd, model_copy, digit_png)
    assert_one_error_line(code, out, err, f"error: --model-dir {model_copy}: {expected}")
    assert seconds < 30, seconds


@pytest.mark.parametrize("kind", ["empty folder", "a file", "no such path"])
def test_a_folder_that_is_no_model_is_one_line(tmp_path, digit_png, capfd, kind):
    target = str(tmp_path / "target")
    if kind == "empty folder":
        os.mkdir(target)
    elif kind == "a file":
        with open(target, "w") as handle:
            handle.write("not a model")
    expected = {"empty folder": "no saved_model.pb there", "a file": "a file, not a folder",
                "no such path": "no such folder"}[kind]
    code, out, err, seconds = predict_in_process(capfd, target, digit_png)
    assert_one_error_line(code, out, err, f"error: --model-dir {target}: {expected}")
    assert seconds < 5, seconds


def test_a_model_dir_on_gs_without_a_bucket_is_named_at_once():
    """gs:// with no bucket is a command-line mistake: exit 2 before any I/O, TensorFlow never imported."""
    from helpers import main_in_fresh_interpreter

    for url in ("gs://", "gs:///runs/model"):
        outcome = main_in_fresh_interpreter("trainer.predict", ["--model-dir", url, "image.png"])
        assert outcome["code"] == 2 and outcome["out"] == "" and outcome["heavy"] == [], outcome
        assert outcome["err"] == f"error: --model-dir {url}: no bucket named (write gs://BUCKET/PATH, e.g. " \
                                 "gs://my-bucket/runs/run1/model)\n", outcome


def test_a_model_without_class_names_names_its_classes_by_digit(model_copy, digit_png, capfd):
    """class_names.json missing (a folder copied without it): the classes are digits, as before; no warning."""
    os.remove(os.path.join(model_copy, "class_names.json"))
    code, out, err, _ = predict_in_process(capfd, model_copy, digit_png)
    assert code == 0 and err == "", err
    path, label, probability = out.strip().split("\t")
    assert path == digit_png and label in [str(digit) for digit in range(10)] and 0 < float(probability) <= 1


@pytest.mark.slow
@pytest.mark.parametrize("case", ["saved_model.pb garbage", "data truncated"])
def test_in_a_fresh_process_stderr_is_still_one_line(model_copy, digit_png, case):
    """A real process imports TensorFlow itself, whose C++ start-up writes to stderr whatever TF_CPP_MIN_LOG_LEVEL
    says (absl's warning and oneDNN's notice, twice); none of it may reach the user around the one line."""
    dict((row[0], row[1]) for row in CASES)[case](model_copy)
    env = {name: value for name, value in trainer_env().items() if name != "TF_CPP_MIN_LOG_LEVEL"}  # as users run it
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "trainer.predict", "--model-dir", model_copy, digit_png],
                            cwd=ROOT_DIR, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - started
    expected = dict((row[0], row[2]) for row in CASES)[case]
    assert_one_error_line(result.returncode, result.stdout, result.stderr,
                          f"error: --model-dir {model_copy}: {expected}")
    assert seconds < 60, seconds


def test_startup_lines_below_the_log_level_are_held_back(monkeypatch):
    from trainer.errors import startup_lines_to_show

    chatter = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
               "I0000 00:00:1796037141.880327    9283 port.cc:153] oneDNN custom operations are on.\n"
               "W0000 00:00:1796037141.880327    9283 some.cc:1] a warning\n"
               "E0000 00:00:1796037141.880327    9283 other.cc:2] an error\n"
               "something else\n")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    assert startup_lines_to_show(chatter) == [chatter.splitlines()[3], "something else"]
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    assert startup_lines_to_show(chatter) == chatter.splitlines()[1:]


def test_odd_images_are_one_line_each_and_the_rest_are_still_classified(model_copy, digit_png, tmp_path, capfd):
    """A 3x2 image whose levels defeated the threshold's histogram and a float TIFF with a NaN pixel: each is
    classified or named in one line; the good image beside them is classified either way."""
    import numpy as np
    from PIL import Image

    tiny = str(tmp_path / "tiny.png")
    Image.fromarray(np.array([[255, 0, 1], [1, 1, 0]], dtype=np.uint8)).save(tiny)
    nan = str(tmp_path / "nan.tif")
    pixels = np.zeros((28, 28), dtype=np.float32)
    pixels[8:20, 12:16] = 1.0
    pixels[0, 0] = np.nan
    Image.fromarray(pixels, mode="F").save(nan)
    capfd.readouterr()
    code, out, err, _ = predict_in_process(capfd, model_copy, digit_png, tiny, nan)
    assert "Traceback" not in err and "unexpected" not in err and "RuntimeWarning" not in err, err
    lines = out.strip().splitlines()
    assert lines[0].split("\t")[0] == digit_png, out
    named = {line.split("\t")[0] for line in lines} | {line.split(":")[1].strip() for line in err.splitlines()}
    assert {tiny, nan} <= named, (out, err)
    assert len(lines) + len(err.strip().splitlines()) == 3 and code in (0, 1), (out, err)


def test_show_never_overwrites_an_input_image_or_takes_an_empty_path(digit_png, tmp_path):
    from helpers import main_in_fresh_interpreter

    before = open(digit_png, "rb").read()
    for show, expected in ((digit_png, "is also one of the images to classify"), ("", "an empty path")):
        outcome = main_in_fresh_interpreter("trainer.predict", ["--model-dir", str(tmp_path), "--show", show,
                                                                digit_png])
        assert outcome["code"] == 2 and outcome["heavy"] == [], outcome
        assert f"error: --show{' ' + show if show else ''}: {expected}" in outcome["err"].strip().splitlines()[-1]
    assert open(digit_png, "rb").read() == before


def test_a_model_dir_bucket_cloud_storage_refuses_is_exit_2_at_once():
    from helpers import main_in_fresh_interpreter

    outcome = main_in_fresh_interpreter("trainer.predict", ["--model-dir", "gs://Bad_Bucket!/model", "a.png"])
    assert outcome["code"] == 2 and outcome["heavy"] == [], outcome
    assert "--model-dir gs://Bad_Bucket!/model: bucket name 'Bad_Bucket!' is not valid" in outcome["err"]


def test_a_path_or_class_name_with_a_newline_stays_one_output_line(model_copy, digit_png, tmp_path, capfd):
    odd = str(tmp_path / "two\nlines.png")
    shutil.copy(digit_png, odd)
    for name in ("class_names.json", "training_images.json"):  # both record the names
        with open(os.path.join(model_copy, name)) as handle:
            recorded = json.load(handle)
        if isinstance(recorded, dict):
            recorded["class_names"] = [class_name + "\nx" for class_name in recorded["class_names"]]
        else:
            recorded = [class_name + "\nx" for class_name in recorded]
        with open(os.path.join(model_copy, name), "w") as handle:
            json.dump(recorded, handle)
    capfd.readouterr()
    code, out, err, _ = predict_in_process(capfd, model_copy, odd)
    assert code == 0 and err == "", err
    assert out.count("\n") == 1 and out.startswith(odd.replace("\n", "\\n") + "\t") and "\\nx" in out, out


@pytest.mark.parametrize("name", ["class_names.json", "training_images.json"])
def test_a_named_pipe_in_place_of_a_model_file_is_one_line_not_a_wait(model_copy, digit_png, capfd, name):
    path = os.path.join(model_copy, name)
    os.remove(path)
    os.mkfifo(path)
    code, out, err, seconds = predict_in_process(capfd, model_copy, digit_png)
    assert_one_error_line(code, out, err, f"error: --model-dir {model_copy}: {name}: is a named pipe, not a regular "
                                          "file")
    assert seconds < 10, seconds
