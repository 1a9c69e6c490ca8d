"""What an exported model folder is: the files an export writes, how a new export replaces an old one
without a moment of half a model, what an export killed part-way leaves behind, when a folder (local or
gs://) holds a complete model, the checks a folder passes before TensorFlow loads it, and
training_images.json, the export's description of the images the model was trained on (their shape,
channels, class names and how they were made).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from typing import List, NamedTuple, Optional, Sequence, Tuple

from trainer import storage
from trainer.atomic import read_regular_file
from trainer.errors import TrainerError, require_tensorflow
from trainer.joblock import process_alive

SAVED_MODEL = "saved_model.pb"
CLASS_NAMES_FILE = "class_names.json"
TRAINING_IMAGES_FILE = "training_images.json"
KERAS_FILE = "model.keras"
SIGNATURE = "serving_default"
# What an export writes into a model folder (`_SUCCESS` comes with a gs:// publish).
EXPORT_NAMES = {SAVED_MODEL, "fingerprint.pb", "variables", "assets", KERAS_FILE, CLASS_NAMES_FILE,
                TRAINING_IMAGES_FILE, storage.SUCCESS_MARKER}


def is_exported_model(names) -> bool:
    """Folder entries (relative paths) that only an export (or a publish cut short) could have made."""
    return all(name.split("/")[0] in EXPORT_NAMES for name in names)


def is_model_folder(path: str) -> bool:
    """True when `path` is absent, empty or holds only what an export writes: the only folders export replaces."""
    if not os.path.isdir(path):
        return not os.path.exists(path)
    return is_exported_model(os.listdir(path))


def foreign_model_dir(shown: str) -> TrainerError:
    """The refusal of a --model-dir that holds something an export would have to delete."""
    return TrainerError(f"--model-dir {shown}: holds files that are not a model exported by this trainer; the "
                        "export would delete them, so choose an empty or new folder")


def is_complete(model_dir: str) -> bool:
    """A whole exported model is there: saved_model.pb locally, the _SUCCESS marker on gs://."""
    if storage.is_gcs(model_dir):
        return storage.SUCCESS_MARKER in storage.list_objects(model_dir)
    return os.path.isfile(os.path.join(model_dir, SAVED_MODEL))


# ------------------------------------------------------------------------------ replacing a model folder

def staging_dir(model_dir: str) -> str:
    """A new empty folder beside `model_dir` to write the next export into: `.NAME.partial-PID-XXXXXXXX`."""
    model_dir = os.path.abspath(model_dir.rstrip("/"))
    parent = os.path.dirname(model_dir)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(model_dir)}.partial-{os.getpid()}-", dir=parent)


def swap_in(staged: str, final: str) -> None:
    """Swap a finished folder into place; the old one (`.NAME.replaced-PID` meanwhile) is removed only after
    the new one is in."""
    final = final.rstrip("/")
    previous = None
    if os.path.exists(final):
        if not is_model_folder(final):
            raise foreign_model_dir(final)
        previous = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.replaced-{os.getpid()}")
        os.replace(final, previous)
    os.replace(staged, final)
    if previous:
        shutil.rmtree(previous, ignore_errors=True)


_DEBRIS = (re.compile(r"^\.(?P<base>.+)\.(?P<kind>partial)-(?P<pid>\d{1,7})-[a-z0-9_]{8}$"),
           re.compile(r"^\.(?P<base>.+)\.(?P<kind>replaced)-(?P<pid>\d{1,7})$"))


def remove_export_debris(model_dir: str) -> List[str]:
    """Remove what an export killed part-way left beside `model_dir` when process PID is gone:
    `.NAME.partial-PID-XXXXXXXX` staging folders and `.NAME.replaced-PID` swapped-out models (one whose
    replacement never arrived is put back instead). Returns the removed names."""
    model_dir = os.path.abspath(model_dir.rstrip("/"))
    parent, base = os.path.split(model_dir)
    removed = []
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else ():
        match = _DEBRIS[0].match(name) or _DEBRIS[1].match(name)
        if not match or match["base"] != base:
            continue
        pid, path = int(match["pid"]), os.path.join(parent, name)
        if pid != os.getpid() and process_alive(pid):
            continue  # another live process's export in progress
        if match["kind"] == "replaced" and not is_model_folder(path):
            continue  # not what an export swapped out: leave it alone
        if match["kind"] == "replaced" and not os.path.exists(model_dir):
            os.replace(path, model_dir)  # killed between the two renames: the previous model comes back
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(name)
    return removed


# ------------------------------------------------------------------------------- checks before loading
#
# A model folder is checked before TensorFlow loads it, so that whatever is wrong is one line naming the file:
# the files every export writes (present, files, not empty) and class_names.json without TensorFlow; then
# saved_model.pb's parse and signature, and every variable read back from variables/; only then
# tf.saved_model.load (whose own errors are many types with many lines, some naming no file).

# A folder whose training_images.json records no shape and no class names (or that has no such file) holds
# a model of MNIST's form: 28x28 grey images, ten classes (the digits' names when class_names.json is absent).
DIGIT_SIDE = 28
DIGIT_CLASSES = 10


def signature_takes(height: int, width: int, channels: int) -> List[str]:
    """The serving signature's input, as `_describe` writes it: uint8 [N,H,W] grey, [N,H,W,3] colour."""
    return [f"image uint8 [?,{height},{width}{',3' if channels == 3 else ''}]"]


def signature_returns(classes: int) -> List[str]:
    """The serving signature's outputs for a model of `classes` classes."""
    return ["classes int64 [?]", f"probabilities float32 [?,{classes}]"]


TAKES = signature_takes(DIGIT_SIDE, DIGIT_SIDE, 1)
RETURNS = signature_returns(DIGIT_CLASSES)
INDEX_FILE = "variables/variables.index"
_DATA_FILE = re.compile(r"^variables\.data-\d{5}-of-(\d{5})$")


def fault(shown: str, problem: str) -> TrainerError:
    """What is wrong with the model folder the user named (`shown`, as typed)."""
    return TrainerError(f"--model-dir {shown}: {problem}")


def local_model_dir(model_dir: str) -> str:
    """A folder with the SavedModel on this machine: gs:// is copied into the cache once it is complete."""
    if storage.is_gcs(model_dir):
        url = model_dir.rstrip("/")
        before = _success_generation(url)
        if before is None:
            raise TrainerError(f"--model-dir {url}: no {storage.SUCCESS_MARKER} object there, so no complete model "
                               f"(a run writes it last, once the whole model is uploaded)")
        try:
            model_dir = storage.cached_copy(url)
        except TrainerError as error:
            raise TrainerError(f"--model-dir {url}: {error}") from None
        except Exception as error:  # connection refused, DNS failure...
            raise TrainerError(f"--model-dir {url}: cannot download it ({type(error).__name__})") from None
        if _success_generation(url) != before:
            raise TrainerError(f"--model-dir {url}: the model was replaced while it was being downloaded; run again")
    return model_dir


def _success_generation(url: str) -> Optional[int]:
    try:
        marker = storage.list_objects(url).get(storage.SUCCESS_MARKER)
    except TrainerError as error:
        raise TrainerError(f"--model-dir {url}: {error}") from None
    except Exception as error:
        raise TrainerError(f"--model-dir {url}: cannot reach Cloud Storage ({type(error).__name__})") from None
    return None if marker is None else int(marker.generation or 0)


def data_files(local: str, shown: str = "") -> List[str]:
    """The variables' data shards the folder should have (`variables/variables.data-0000i-of-0000N`)."""
    folder = os.path.join(local, "variables")
    try:
        entries = os.listdir(folder)
    except OSError as error:  # unreadable, a file, a symbolic link loop, a path through a file
        raise fault(shown or local, f"cannot read variables/ ({error.strerror or type(error).__name__})") from None
    counts = [int(match.group(1)) for match in map(_DATA_FILE.match, entries) if match]
    shards = max(counts, default=1)
    return [f"variables/variables.data-{shard:05d}-of-{shards:05d}" for shard in range(shards)]


def _require_file(local: str, name: str, shown: str) -> None:
    path = os.path.join(local, name)
    if not os.path.exists(path):
        raise fault(shown, f"{name} is missing, so the model is incomplete")
    if not os.path.isfile(path):
        raise fault(shown, f"{name} is a folder, not a file")
    if os.path.getsize(path) == 0:
        raise fault(shown, f"{name} is empty (0 bytes), so the model is incomplete")


def check_model_files(local: str, shown: str) -> None:
    """The files of an exported model are there, files and not empty (no TensorFlow needed for this)."""
    if not os.path.exists(local):
        raise fault(shown, "no such folder")
    if not os.path.isdir(local):
        raise fault(shown, "a file, not a folder (point it at a run's model/ folder)")
    if not os.path.exists(os.path.join(local, SAVED_MODEL)):
        raise fault(shown, "no saved_model.pb there (point it at a run's model/ folder)")
    _require_file(local, SAVED_MODEL, shown)
    variables = os.path.join(local, "variables")
    if not os.path.lexists(variables):
        raise fault(shown, "variables/ is missing, so the model has no weights")
    try:
        mode = os.stat(variables).st_mode
    except OSError as error:  # a symbolic link loop, or one to a path through a file
        raise fault(shown, f"cannot read variables/ ({error.strerror or type(error).__name__})") from None
    if not stat.S_ISDIR(mode):
        raise fault(shown, "variables is a file, not the folder of the model's weights")
    for name in [INDEX_FILE, *data_files(local, shown)]:
        _require_file(local, name, shown)


def _json_kind(value) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}
    return kinds.get(type(value), "a number")


def _read_json_file(local: str, name: str, shown: str):
    """The JSON value of the model folder's file `name`, or a one-line fault naming what is wrong with it."""
    path = os.path.join(local, name)
    if os.path.isdir(path):
        raise fault(shown, f"{name} is a folder, not a file")
    try:  # a named pipe (or any other non-regular file) in its place is refused, not waited on
        return json.loads(read_regular_file(path, f"--model-dir {shown}: {name}").decode("utf-8"))
    except IsADirectoryError:
        raise fault(shown, f"{name} is a folder, not a file") from None
    except UnicodeDecodeError:
        raise fault(shown, f"{name} is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise fault(shown, f"{name} is not valid JSON ({error.msg} at line {error.lineno} "
                            f"column {error.colno})") from None
    except OSError as error:
        raise fault(shown, f"cannot read {name} ({error.strerror or type(error).__name__})") from None


def _name_fault(names, file: str, shown: str) -> None:
    """A fault when `names` (from `file`) has an entry that is not a name."""
    for number, name in enumerate(names, start=1):
        if not isinstance(name, str) or not name.strip():
            what = "an empty string" if isinstance(name, str) else _json_kind(name)
            raise fault(shown, f"{file}: name {number} is {what}, not a name")


def read_class_names(local: str, shown: str, training: Optional[TrainingImages] = None) -> List[str]:
    """The names in class_names.json: a JSON list of the model's K names. When training_images.json records
    class names (`training.class_names`), class_names.json must hold the same list, and stands in for it when
    absent; when it records none, the model is of MNIST's form: ten names, the digits when the file is absent
    (a folder copied without it, or exported before it existed)."""
    recorded = training.class_names if training is not None else None
    if not os.path.lexists(os.path.join(local, CLASS_NAMES_FILE)):
        return list(recorded) if recorded is not None else [str(digit) for digit in range(DIGIT_CLASSES)]
    names = _read_json_file(local, CLASS_NAMES_FILE, shown)
    count = len(recorded) if recorded is not None else DIGIT_CLASSES
    wanted = f"not a list of {count} names"
    if not isinstance(names, list):
        raise fault(shown, f"{CLASS_NAMES_FILE} holds {_json_kind(names)}, {wanted}")
    if len(names) != count:
        source = f" (as {TRAINING_IMAGES_FILE}'s class_names)" if recorded is not None else ""
        raise fault(shown, f"{CLASS_NAMES_FILE} holds {len(names)} names, {wanted}{source}")
    _name_fault(names, CLASS_NAMES_FILE, shown)
    if recorded is not None:
        for number, (name, expected) in enumerate(zip(names, recorded, strict=True), start=1):
            if name != expected:
                raise fault(shown, f"{CLASS_NAMES_FILE}: name {number} is {json.dumps(name)}, but "
                                    f"{TRAINING_IMAGES_FILE}'s class_names has {json.dumps(expected)}")
    return names


class TrainingImages(NamedTuple):
    """How the images a model was trained on are made (training_images.json; see `images.describe_images`).
    A file without the shape keys describes a model of MNIST's form (the defaults)."""

    background: str  # "dark" or "light"
    background_level: int  # 0..255, the median grey of the images' outermost ring of pixels
    object_side: int  # pixels: the longest side of the object's box (20 for MNIST's digits, 28 for garments)
    centring: str  # "mass": centre of mass at the frame's centre (MNIST); "box": the box centred (Fashion-MNIST)
    height: int = DIGIT_SIDE  # the model's input, in pixels
    width: int = DIGIT_SIDE
    channels: int = 1  # 1: grey, uint8 [N,H,W]; 3: colour, uint8 [N,H,W,3]
    class_names: Optional[Tuple[str, ...]] = None  # None: not recorded (class_names.json holds ten)
    preprocess: str = "frame"  # "resize": trained on files resized to the model's size; "frame": images at its size


# What a folder without training_images.json (exported before the file existed) holds: MNIST's digits.
DIGITS = TrainingImages(background="dark", background_level=0, object_side=20, centring="mass")
TRAINING_IMAGES_VERSION = 1
MAX_SIDE = 4096  # pixels: the largest height or width training_images.json may give
_CHOICES = dict(background=("dark", "light"), centring=("mass", "box"))
_SHAPE_CHOICES = dict(channels=(1, 3), preprocess=("resize", "frame"))


def write_training_images(folder: str, description: dict) -> None:
    """training_images.json in an export's folder: `description` (from `images.describe_images`: the
    statistics, height, width, channels, class_names and preprocess) and its version. Readers ignore keys
    they do not know, so later versions may add some."""
    with open(os.path.join(folder, TRAINING_IMAGES_FILE), "w", encoding="utf-8") as out:
        json.dump({"version": TRAINING_IMAGES_VERSION, **description}, out, indent=1)
        out.write("\n")


def _whole(described: dict, key: str, low: int, high: int, shown: str) -> int:
    value = described.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise fault(shown, f"{TRAINING_IMAGES_FILE}: {key} is {json.dumps(value)}, not a whole number "
                            f"from {low} to {high}")
    return value


def _choice(described: dict, key: str, choices: Sequence, shown: str):
    value = described.get(key)
    if not any(type(value) is type(choice) and value == choice for choice in choices):  # 1.0 or true is not 1
        wanted = " or ".join(json.dumps(choice) for choice in choices)
        raise fault(shown, f"{TRAINING_IMAGES_FILE}: {key} is {json.dumps(value)}, not {wanted}")
    return value


def _recorded_names(described: dict, shown: str) -> Optional[Tuple[str, ...]]:
    """training_images.json's class_names (a list of at least two names), or None when it has none."""
    if "class_names" not in described:
        return None
    names = described["class_names"]
    if not isinstance(names, list) or len(names) < 2:
        what = f"{len(names)} name{'s' * (len(names) != 1)}" if isinstance(names, list) else _json_kind(names)
        raise fault(shown, f"{TRAINING_IMAGES_FILE}: class_names is {what}, not a list of at least 2 names")
    _name_fault(names, f"{TRAINING_IMAGES_FILE}: class_names", shown)
    return tuple(names)


def read_training_images(local: str, shown: str) -> Optional[TrainingImages]:
    """training_images.json checked, or None when the folder has none (a model exported before the file
    existed: its images are taken as MNIST's digits). Keys it lacks take the defaults of MNIST's form."""
    name = TRAINING_IMAGES_FILE
    if not os.path.lexists(os.path.join(local, name)):
        return None
    described = _read_json_file(local, name, shown)
    if not isinstance(described, dict):
        raise fault(shown, f"{name} holds {_json_kind(described)}, not an object")
    version = described.get("version")
    if version != TRAINING_IMAGES_VERSION:
        raise fault(shown, f"{name} is version {json.dumps(version)}, not {TRAINING_IMAGES_VERSION}: "
                            "written by another release of the trainer")
    for key, choices in _CHOICES.items():
        _choice(described, key, choices, shown)
    height, width = (_whole(described, key, 1, MAX_SIDE, shown) if key in described else DIGIT_SIDE
                     for key in ("height", "width"))
    channels, preprocess = (_choice(described, key, choices, shown) if key in described
                            else TrainingImages._field_defaults[key] for key, choices in _SHAPE_CHOICES.items())
    level = _whole(described, "background_level", 0, 255, shown)
    side = _whole(described, "object_side", 1, max(height, width), shown)
    return TrainingImages(background=described["background"], background_level=level, object_side=side,
                          centring=described["centring"], height=height, width=width, channels=channels,
                          class_names=_recorded_names(described, shown), preprocess=preprocess)


def _parse(local: str, name: str, message, what: str, shown: str):
    """File `name` parsed into the protocol buffer `message`, or a fault naming it (`what` it should be)."""
    from google.protobuf.message import DecodeError

    try:
        with open(os.path.join(local, name), "rb") as handle:
            message.ParseFromString(handle.read())
    except OSError as error:
        raise fault(shown, f"cannot read {name} ({error.strerror or type(error).__name__})") from None
    except DecodeError:
        raise fault(shown, f"{name} is damaged or not {what} (it does not parse)") from None
    return message


def read_saved_model(local: str, shown: str):
    """saved_model.pb parsed (a `SavedModel` protocol buffer); fingerprint.pb, when there, must parse too
    (TensorFlow would log a traceback about it and carry on)."""
    from tensorflow.core.protobuf import fingerprint_pb2, saved_model_pb2

    saved_model = _parse(local, "saved_model.pb", saved_model_pb2.SavedModel(), "a SavedModel", shown)
    if not saved_model.meta_graphs:
        raise fault(shown, "saved_model.pb is damaged or not a SavedModel (it holds no graph)")
    if os.path.exists(os.path.join(local, "fingerprint.pb")):
        _parse(local, "fingerprint.pb", fingerprint_pb2.FingerprintDef(), "a SavedModel fingerprint", shown)
    return saved_model


def _dtype_name(tf, number: int) -> str:
    try:
        return tf.dtypes.as_dtype(number).name
    except TypeError:  # DT_INVALID: a composite tensor (sparse, ragged)
        return "composite"


def _describe(tf, tensors) -> List[str]:
    """A signature's tensors as 'name dtype [?,28,28]' (`?` an unknown size), sorted by name."""
    described = []
    for name, info in sorted(tensors.items()):
        shape = info.tensor_shape
        dims = "[...]" if shape.unknown_rank else "[" + ",".join(str(d.size) if d.size >= 0 else "?"
                                                                 for d in shape.dim) + "]"
        described.append(f"{name} {_dtype_name(tf, info.dtype)} {dims}")
    return described


_TRAINER_INPUT = re.compile(r"^image uint8 \[\?,\d+,\d+(,3)?\]$")
_TRAINER_OUTPUT = re.compile(r"^probabilities float32 \[\?,\d+\]$")


def _trainer_form(takes: List[str], returns: List[str]) -> bool:
    """Whether a signature has the trainer's form, whatever its sizes: one uint8 image in, classes and
    probabilities out."""
    return (len(takes) == 1 and bool(_TRAINER_INPUT.match(takes[0])) and "classes int64 [?]" in returns
            and any(map(_TRAINER_OUTPUT.match, returns)))


def check_signature(tf, saved_model, shown: str, training: Optional[TrainingImages] = None,
                    classes: int = DIGIT_CLASSES) -> None:
    """The trainer's serving signature, of the shape the folder's metadata gives: image uint8 [N,H,W] (grey) or
    [N,H,W,3] (colour) -> classes int64 [N], probabilities float32 [N,K], K = `classes` (its class names).
    Without training_images.json (or without its shape keys) [N,28,28] -> [N,10]. A signature of the trainer's
    form that disagrees with metadata recording the shape and names is said to be another export's."""
    graphs = [graph for graph in saved_model.meta_graphs if "serve" in graph.meta_info_def.tags]
    signatures = (graphs or saved_model.meta_graphs)[0].signature_def
    foreign = "saved_model.pb is not a model exported by this trainer"
    if SIGNATURE not in signatures:
        raise fault(shown, f"{foreign}: it has no {SIGNATURE} signature")
    takes, returns = _describe(tf, signatures[SIGNATURE].inputs), _describe(tf, signatures[SIGNATURE].outputs)
    shape = training or DIGITS
    expected_takes = signature_takes(shape.height, shape.width, shape.channels)
    expected_returns = signature_returns(classes)
    if takes == expected_takes and set(expected_returns) <= set(returns):
        return
    mixed = shape.class_names is not None and _trainer_form(takes, returns)
    raise fault(shown, f"{foreign}: its {SIGNATURE} maps {', '.join(takes[:3]) or 'nothing'} -> "
                        f"{', '.join(returns[:3]) or 'nothing'}, not {', '.join(expected_takes)} -> "
                        f"{', '.join(expected_returns)}"
                        + (f", the shape and classes {TRAINING_IMAGES_FILE} records (is saved_model.pb from "
                           "another export? Export the model again)" if mixed else ""))


def check_variables(tf, local: str, shown: str) -> None:
    """Every variable in variables/ reads back whole (the index parses, each value's bytes and checksum)."""
    try:
        reader = tf.train.load_checkpoint(os.path.join(local, "variables", "variables"))
    except tf.errors.OpError:
        raise fault(shown, f"{INDEX_FILE} is damaged (not a checkpoint index)") from None
    shards = data_files(local)
    culprit = shards[0] if len(shards) == 1 else "variables/variables.data-*"
    for name in reader.get_variable_to_shape_map():
        try:
            reader.get_tensor(name)
        except (IndexError, tf.errors.OpError):  # "Read less bytes than requested", "Checksum does not match"
            # (garbled bytes can read as a string length past the end, so the two do not tell cut from garbled)
            raise fault(shown, f"{culprit} is damaged or truncated (a value does not read back as "
                                f"{INDEX_FILE} describes it)") from None


def load_serving(local: str, shown: str, training: Optional[TrainingImages] = None, classes: int = DIGIT_CLASSES):
    """The model's `serving_default` function, once its files, signature (for images like `training` and
    `classes` classes) and variables are checked."""
    from google.protobuf.message import DecodeError

    tf = require_tensorflow()
    check_signature(tf, read_saved_model(local, shown), shown, training, classes)
    check_variables(tf, local, shown)
    try:
        return tf.saved_model.load(local).signatures[SIGNATURE]
    except (tf.errors.OpError, OSError, ValueError, KeyError, IndexError, DecodeError) as error:
        # e.g. ValueError "Received incompatible tensor with shape ...": variables/ of another export
        raise fault(shown, f"TensorFlow cannot restore variables/ into saved_model.pb's graph "
                            f"({type(error).__name__}), though each reads whole: are they from two different "
                            f"exports? Export the model again") from None
