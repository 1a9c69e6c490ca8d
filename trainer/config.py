"""Every setting of a training run: the command line, presets, AIP_* defaults, validated once.

Nothing here imports TensorFlow or touches the file system, so `--help` and every syntax or range
error (exit 2, argparse style) come back at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import posixpath
import re
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")
MIXED_PRECISION = ("auto", "off", "bf16", "fp16")
JIT_COMPILE = ("auto", "on", "off")
CLASS_NAME_SETS = {
    "digits": tuple(str(d) for d in range(10)),
    "fashion": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
}

def _positive_int_list(text: str, what: str = "filter count") -> Tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 32,64, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every {what} must be a positive integer, got {text!r}")
    return values


IMAGE_SIDES = (4, 1024)  # pixels a side --image-size accepts


def image_size_flag(text: str) -> Tuple[int, int]:
    """'36' -> (36, 36); '32x48' (or '32,48') -> (32, 48): height and width."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = tuple(int(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected SIDE or HEIGHTxWIDTH in pixels such as 32 or 32x48, got {text!r}")
    low, high = IMAGE_SIDES
    if not all(low <= value <= high for value in values):
        raise argparse.ArgumentTypeError(f"each side must be {low} to {high} pixels, got {text!r}")
    return values


def _step_range(text: str) -> Tuple[int, int]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected START,END such as 10,20, got {text!r}")
    if not 1 <= values[0] < values[1]:
        raise argparse.ArgumentTypeError(f"needs 1 <= START < END (steps count from 1), got {text!r}")
    return values


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


# Every recipe setting, defined once: the parser that reads it (flags and --hparams-file), the seed
# notebook's value, and this project's default.
# seed: the notebook exactly: two conv+pool blocks, Dense(128), Dropout(0.5), Adam 1e-3, batch 128.
# default: two 3x3 same-padded convs per block with narrower filters, batch norm, a cosine decay from a
# higher peak rate; the first epochs on plain images with dropout 0.4, then random shifts with lighter
# dropout, label smoothing and decoupled weight decay. The runs behind each choice, with their commands and
# figures, are in bench/results/recipe.md.
RECIPE: Dict[str, Tuple[Callable[[str], Any], Any, Any]] = {
    #                  parser               seed         default
    "filters":         (_positive_int_list, (32, 64),    (16, 32)),
    "dense_units":     (int,                128,         256),
    "dropout":         (float,              0.5,         0.2),
    "learning_rate":   (float,              1e-3,        4e-3),
    "batch_size":      (int,                128,         128),
    "epochs":          (int,                10,          20),
    "convs_per_block": (int,                1,           2),
    "padding":         (str,                "valid",     "same"),
    "batch_norm":      (_bool,              False,       True),
    "lr_schedule":     (str,                "constant",  "cosine"),
    "warmup_epochs":   (float,              0.0,         0.0),
    "augment":         (str,                "none",      "shift"),
    "unaugmented_epochs": (int,             0,           2),
    "unaugmented_dropout": (float,          0.5,         0.4),
    "label_smoothing": (float,              0.0,         0.1),
    "weight_decay":    (float,              0.0,         0.05),
}
SEED_RECIPE: Dict[str, Any] = {key: seed for key, (_, seed, _) in RECIPE.items()}
DEFAULT_RECIPE: Dict[str, Any] = {key: default for key, (_, _, default) in RECIPE.items()}
# quick: the default recipe over fewer epochs (its cosine decay spans those), what `make train` runs first.
QUICK_EPOCHS = 3
PRESETS: Dict[str, Dict[str, Any]] = {
    "seed": SEED_RECIPE,
    "default": DEFAULT_RECIPE,
    "quick": dict(DEFAULT_RECIPE, epochs=QUICK_EPOCHS),
}
# Values an --hparams-file may set (the recipe), and the settings a checkpoint must share with the run
# that resumes from it: the data and the recipe, except epochs (a resumed run may train longer).
HPARAM_KEYS = {key: parse for key, (parse, _, _) in RECIPE.items()}
RESUME_KEYS = ("dataset", "train_limit", "validation_fraction", "seed", "image_size", "flip") + tuple(
    key for key in RECIPE if key != "epochs")
LR_SCHEDULES = ("constant", "cosine")
AUGMENTATIONS = ("none", "shift", "shift-flip", "shift-erase")
PADDINGS = ("valid", "same")

_TFDS_NAME = re.compile(r"^[a-z][a-z0-9_]*(/[a-z0-9_]+)?(:[0-9.*]+)?$")
# Cloud Storage bucket names: 3-63 characters (up to 222 with dots), lowercase letters, digits, -, _ and .,
# starting and ending with a letter or digit.
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
# Upper bounds the machine or the numbers set: seeds are 32-bit (NumPy's generator and
# the data order), thread pools beyond a few per core only cost memory and start-up (50,000 hung here).
MAX_SEED = 2 ** 32 - 1
MAX_EPOCHS = 1_000_000
MAX_CLUSTER_WAIT = 7 * 24 * 3600  # Vertex AI's longest job timeout
MAX_CPU_DEVICES = 64


def max_threads() -> int:
    return max(64, 4 * (os.cpu_count() or 1))


def bucket_problem(path: str) -> Optional[str]:
    """Why a gs:// path's bucket name is not one Cloud Storage accepts, or None."""
    bucket = path[len("gs://"):].split("/", 1)[0]
    if not bucket:
        return "has no bucket name"
    if not _BUCKET_NAME.match(bucket) or ".." in bucket or (len(bucket) > 63 and "." not in bucket):
        return (f"bucket name {bucket!r} is not valid (3-63 lowercase letters, digits, '-', '_' or '.', starting "
                "and ending with a letter or digit)")
    return None


# The default of every recipe field: None until __post_init__ fills in the preset's value, so typed as
# the field's own type for everything that reads a built Config.
FROM_PRESET: Any = None


@dataclasses.dataclass(frozen=True)
class Config:
    """The resolved settings of one run. Built by `parse_config`; tests may build it directly.

    Recipe settings left unset (None) take the value of the preset the Config names, so
    `Config(job_dir=..., preset="seed")` is the seed notebook's network and `Config(job_dir=...)` the default.
    A given `dropout` without `unaugmented_dropout` is the rate of every epoch.
    """

    job_dir: str
    dataset: str = "mnist"
    data_dir: Optional[str] = None
    train_limit: Optional[int] = None
    validation_fraction: float = 0.1
    epochs: int = FROM_PRESET
    batch_size: int = FROM_PRESET
    learning_rate: float = FROM_PRESET
    filters: Tuple[int, ...] = FROM_PRESET
    dense_units: int = FROM_PRESET
    dropout: float = FROM_PRESET
    convs_per_block: int = FROM_PRESET
    padding: str = FROM_PRESET
    batch_norm: bool = FROM_PRESET
    lr_schedule: str = FROM_PRESET
    warmup_epochs: float = FROM_PRESET
    augment: str = FROM_PRESET
    unaugmented_epochs: int = FROM_PRESET
    unaugmented_dropout: float = FROM_PRESET
    label_smoothing: float = FROM_PRESET
    weight_decay: float = FROM_PRESET
    seed: int = 42
    preset: str = "default"
    model_dir: str = ""
    log_dir: str = ""
    checkpoint_dir: str = ""
    strategy: str = "auto"
    tpu: Optional[str] = None
    cpu_devices: int = 0
    mixed_precision: str = "auto"
    jit_compile: str = "auto"
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    cluster_wait: float = 600.0
    steps_per_execution: int = 20
    profile_steps: Optional[Tuple[int, int]] = None
    resume: bool = True
    class_names: str = "auto"
    hypertune: bool = False
    image_size: Optional[Tuple[int, int]] = None  # folder: the size images are resized to (None: the most common)
    flip: Optional[bool] = None  # mirror training images (None: where the data keeps its classes mirrored)

    def __post_init__(self):
        if self.preset not in PRESETS:  # checked here, not in validate: the preset fills the recipe first
            raise ValueError(f"--preset must be one of {', '.join(PRESETS)}")
        if self.unaugmented_dropout is None and self.dropout is not None:  # a given rate is every epoch's
            object.__setattr__(self, "unaugmented_dropout", self.dropout)
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        # Derived folders default to the job dir's sub-folders: model/, logs/, checkpoints/.
        for name, sub in (("model_dir", "model"), ("log_dir", "logs"), ("checkpoint_dir", "checkpoints")):
            if not getattr(self, name):
                object.__setattr__(self, name, join_path(self.job_dir, sub))
        validate(self)

    @property
    def dataset_kind(self) -> str:
        """"idx", "folder" or "tfds"."""
        for kind in ("idx", "folder"):
            if self.dataset.startswith(kind + ":"):
                return kind
        return "tfds"

    @property
    def idx_dir(self) -> str:
        return self.dataset[len("idx:"):]

    @property
    def folder_dir(self) -> str:
        return self.dataset[len("folder:"):]

    def augment_at(self, epoch: int) -> str:
        """The augmentation of the 0-based `epoch`: none during the first `unaugmented_epochs`."""
        return self.augment if epoch >= self.unaugmented_epochs else "none"

    def regularisation_at(self, epoch: int) -> Tuple[float, float, float]:
        """(dropout, label smoothing, weight decay) of the 0-based `epoch`: the first `unaugmented_epochs` train
        with `unaugmented_dropout` and neither label smoothing nor weight decay."""
        if epoch < self.unaugmented_epochs:
            return self.unaugmented_dropout, 0.0, 0.0
        return self.dropout, self.label_smoothing, self.weight_decay

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["filters"] = list(self.filters)
        if self.image_size is not None:
            values["image_size"] = list(self.image_size)
        return values


def join_path(base: str, *parts: str) -> str:
    """Join local paths and gs:// URLs alike (gs:// always takes forward slashes)."""
    if base.startswith("gs://"):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def _check_names_and_paths(config: Config, require) -> None:
    """--class-names: two or more distinct, non-empty, printable names; every path valid UTF-8 (as TensorFlow's
    file names are)."""
    if config.class_names not in ("auto",) + tuple(CLASS_NAME_SETS):
        names = [name.strip() for name in config.class_names.split(",")]
        require(len(names) >= 2, "--class-names must be auto, digits, fashion or one comma-separated name per class "
                                 "(two or more)")
        require(all(names), f"--class-names {config.class_names!r}: name {names.index('') + 1 if '' in names else 0} "
                            "is empty; give every class a name")
        require(len(set(names)) == len(names),
                f"--class-names {config.class_names!r}: names repeat; give each class its own")
        unprintable = [number for number, name in enumerate(names, start=1) if not name.isprintable()]
        require(not unprintable, f"--class-names {config.class_names!r}: name {unprintable[0] if unprintable else 0} "
                                 "holds a tab, newline or other control character; names are printed one per line")
    for flag, path in list(output_folders(config).items()) + [("--dataset", config.dataset),
                                                                ("--data-dir", config.data_dir or "")]:
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            require(False, f"{flag} {path.encode('utf-8', 'surrogateescape')!r}: not valid UTF-8; TensorFlow "
                           "needs UTF-8 file names")


def _check_dataset(config: Config, require) -> None:
    """--dataset's syntax, and the flags that only a folder of images takes."""
    kind = config.dataset_kind
    if kind == "idx":
        require(len(config.idx_dir) > 0, "--dataset idx: needs a folder, e.g. idx:/usr/share/datasets/fashion-mnist")
    elif kind == "folder":
        require(len(config.folder_dir) > 0, "--dataset folder: needs a folder of class subfolders, e.g. folder:photos")
        require(not config.folder_dir.startswith("gs://"),
                f"--dataset {config.dataset}: folder: reads a local folder (on Vertex AI, the Cloud Storage mount "
                "/gcs/BUCKET/...)")
    else:
        require(bool(_TFDS_NAME.match(config.dataset)),
                f"--dataset {config.dataset!r}: expected a TFDS name (mnist, fashion_mnist, cifar10, emnist/balanced), "
                "idx:FOLDER or folder:DIR")
    if config.image_size is not None:
        require(kind == "folder", f"--image-size applies to --dataset folder:DIR only (TFDS and IDX images come at "
                                  f"one size), not to --dataset {config.dataset}")
        low, high = IMAGE_SIDES
        require(all(low <= side <= high for side in config.image_size),
                f"--image-size: each side must be {low} to {high} pixels, got {config.image_size}")
    require(not (config.flip is False and config.augment == "shift-flip"),
            "--no-flip contradicts --augment shift-flip; choose one")


def _check_combinations(config: Config, require) -> None:
    """Flags that another flag's value would make do nothing are refused rather than ignored."""
    require(config.cpu_devices <= 1 or config.strategy == "mirrored",
            f"--cpu-devices {config.cpu_devices} makes replicas for --strategy mirrored only (--strategy "
            f"{config.strategy} would train one); add --strategy mirrored")
    require(not (config.data_dir and config.dataset_kind in ("idx", "folder")),
            f"--data-dir is TFDS's data folder; --dataset {config.dataset} names its own folder, so drop --data-dir")


def _require_rate(flag: str, value: float) -> None:
    """A rate in [0, 1) (dropout, label smoothing, weight decay); the bounds also refuse NaN and infinities."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{flag} must be in [0, 1), got {value}")


def validate(config: Config) -> None:
    """Range and syntax checks that need no I/O; raises ValueError naming the setting."""
    def require(ok: bool, message: str):
        if not ok:
            raise ValueError(message)

    require(config.epochs >= 1, f"--epochs must be at least 1, got {config.epochs}")
    require(config.epochs <= MAX_EPOCHS, f"--epochs must be at most {MAX_EPOCHS:,}, got {config.epochs}")
    require(0 <= config.seed <= MAX_SEED, f"--seed must be in [0, 2**32 - 1], got {config.seed}")
    require(config.batch_size >= 1, f"--batch-size must be at least 1, got {config.batch_size}")
    require(config.learning_rate > 0 and math.isfinite(config.learning_rate),
            f"--learning-rate must be a positive finite number, got {config.learning_rate}")
    require(len(config.filters) >= 1 and all(f >= 1 for f in config.filters),
            f"--filters needs one or more positive integers, got {','.join(map(str, config.filters))}")
    require(config.dense_units >= 1, f"--dense-units must be at least 1, got {config.dense_units}")
    _require_rate("--dropout", config.dropout)
    _require_rate("--unaugmented-dropout", config.unaugmented_dropout)
    require(config.convs_per_block >= 1, f"--convs-per-block must be at least 1, got {config.convs_per_block}")
    require(config.padding in PADDINGS, f"--padding must be one of {', '.join(PADDINGS)}")
    require(config.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}")
    require(0.0 <= config.warmup_epochs < config.epochs,
            f"--warmup-epochs must be in [0, epochs), got {config.warmup_epochs}")
    require(config.augment in AUGMENTATIONS, f"--augment must be one of {', '.join(AUGMENTATIONS)}")
    require(0 <= config.unaugmented_epochs <= MAX_EPOCHS,
            f"--unaugmented-epochs must be in [0, {MAX_EPOCHS:,}], got {config.unaugmented_epochs}")
    _require_rate("--label-smoothing", config.label_smoothing)
    _require_rate("--weight-decay", config.weight_decay)
    require(0.0 < config.validation_fraction < 1.0,
            f"--validation-fraction must be in (0, 1), got {config.validation_fraction}")
    require(config.train_limit is None or config.train_limit >= 2,
            f"--train-limit must be at least 2, got {config.train_limit}")
    require(config.profile_steps is None or 1 <= config.profile_steps[0] < config.profile_steps[1],
            f"--profile-steps needs START,END with 1 <= START < END, got {config.profile_steps}")
    require(config.steps_per_execution >= 1,
            f"--steps-per-execution must be at least 1, got {config.steps_per_execution}")
    require(0 <= config.cpu_devices <= MAX_CPU_DEVICES,
            f"--cpu-devices must be in [0, {MAX_CPU_DEVICES}], got {config.cpu_devices}")
    _check_combinations(config, require)
    threads = (("--intra-op-threads", config.intra_op_threads), ("--inter-op-threads", config.inter_op_threads))
    for flag, value in threads:
        require(0 <= value <= max_threads(), f"{flag} must be in [0, {max_threads()}] (0: TensorFlow's choice; the "
                                             f"bound is 4 per CPU of this machine, at least 64), got {value}")
    require(0 <= config.cluster_wait <= MAX_CLUSTER_WAIT,
            f"--cluster-wait must be in [0, {MAX_CLUSTER_WAIT}] seconds (0: wait forever), got {config.cluster_wait:g}")
    require(config.mixed_precision in MIXED_PRECISION,
            f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
    require(config.strategy in STRATEGIES, f"--strategy must be one of {', '.join(STRATEGIES)}")
    require(config.jit_compile in JIT_COMPILE, f"--jit-compile must be one of {', '.join(JIT_COMPILE)}")
    _check_dataset(config, require)
    _check_names_and_paths(config, require)
    for flag, path in list(output_folders(config).items()) + [("--dataset idx:", config.idx_dir)]:
        if path.startswith("gs://"):
            problem = bucket_problem(path)
            require(problem is None, f"{flag}{'' if flag.endswith(':') else ' '}{path}: {problem}")
    overlap = output_overlap(output_folders(config), lexical_path)
    require(overlap is None, overlap or "")


OUTPUT_FLAGS = {"job_dir": "--job-dir", "model_dir": "--model-dir", "log_dir": "--log-dir",
                "checkpoint_dir": "--checkpoint-dir"}


def output_folders(config: Config) -> dict:
    """{flag: folder} of a run's outputs; `plots/` is the job dir's own (its PNGs are replaced by name)."""
    folders = {flag: getattr(config, name) for name, flag in OUTPUT_FLAGS.items()}
    folders["JOB_DIR/plots"] = join_path(config.job_dir, "plots")
    return folders


def lexical_path(path: str) -> str:
    """A folder's absolute, normalised spelling without touching the file system (gs:// kept as such)."""
    if path.startswith("gs://"):
        return "gs://" + posixpath.normpath(path[len("gs://"):]).lstrip("/")
    return os.path.normpath(os.path.abspath(path))


def _inside(inner: str, outer: str) -> bool:
    """`inner` is `outer` or lies somewhere below it (both canonical)."""
    sep = "/" if outer.startswith("gs://") else os.sep
    return inner == outer or inner.startswith(outer.rstrip(sep) + sep)


def output_overlap(folders: Mapping[str, str], canonical) -> Optional[str]:
    """Why these output folders would destroy each other's files, or None when they are safe.

    Export swaps the whole model folder, `--no-resume` and gs:// checkpoint syncing delete what is not
    theirs: so the model, log and checkpoint folders (and JOB_DIR/plots) must be pairwise apart (neither
    the same nor one inside the other), and none of them may be or contain the job dir. Each may lie
    inside the job dir (the default layout) or anywhere else.
    """
    paths = {flag: canonical(path) for flag, path in folders.items()}
    flags = list(paths)
    for index, flag in enumerate(flags):
        for other in flags[index + 1:]:
            first, second = paths[flag], paths[other]
            if flag == "--job-dir" and not _inside(first, second):
                continue  # an output inside the job dir is the normal layout
            if _inside(first, second) or _inside(second, first):
                relation = ("is the same folder as" if first == second else
                            "lies inside" if _inside(first, second) else "contains")
                return (f"{flag} {folders[flag]} {relation} {other} {folders[other]}: the run would overwrite or "
                        "delete the other's files; give each output its own folder")
    return None


class HelpFormatter(argparse.HelpFormatter):
    """A flag's default after its help only when it says something: not for unset (None) values, on/off
    switches, or help that already names its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is None or action.default is argparse.SUPPRESS or isinstance(action.default, bool)
                or "default" in text):
            return text
        return text + " (default: %(default)s)"


def _preset_values(key: str) -> str:
    """' (from --preset: default X, seed Y)' for a recipe flag's help."""
    def shown(value):
        if isinstance(value, bool):
            return "on" if value else "off"
        return ",".join(map(str, value)) if isinstance(value, tuple) else f"{value:g}" if isinstance(value, float) \
            else str(value)

    quick = PRESETS["quick"][key]
    return (f" (from --preset: default {shown(DEFAULT_RECIPE[key])}"
            f"{'' if quick == DEFAULT_RECIPE[key] else f', quick {shown(quick)}'}, seed {shown(SEED_RECIPE[key])})")


# Settings that name this run's own folders or its resume mode: a follow-up command gets its own.
_NOT_CARRIED = ("job_dir", "preset", "model_dir", "log_dir", "checkpoint_dir", "resume", "hypertune")


def _flag_value(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def command_flags(config: Config, preset: str, skip: Sequence[str] = ()) -> list:
    """The flags that make `python -m trainer.task --preset PRESET` train on this config's data with its
    settings: every setting that differs from what that preset and the defaults give (its own folders,
    resume mode and the keys in `skip` aside), as an argv list."""
    baseline = Config(job_dir=config.job_dir, preset=preset)
    argv = ["--preset", preset] if preset != "default" else []
    for field in dataclasses.fields(Config):
        name = field.name
        value = getattr(config, name)
        if name in _NOT_CARRIED or name in skip or value == getattr(baseline, name) or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):  # --batch-norm / --no-batch-norm
            argv.append(flag if value else f"--no-{name.replace('_', '-')}")
        else:
            argv += [flag, _flag_value(value)]
    return argv


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def full_recipe_hint(config: Config, seconds_per_epoch: Optional[float]) -> str:
    """The line a --preset quick run ends with: the command that trains the full default recipe on the same
    data and settings into a sibling job dir, and how long its training would take at this run's pace
    (seconds per epoch; None when no epoch was trained)."""
    import shlex

    epochs = DEFAULT_RECIPE["epochs"]
    job_dir = config.job_dir.rstrip("/") + "-full"
    argv = ["python", "-m", "trainer.task", *command_flags(config, "default", skip=("epochs",)),
            "--job-dir", job_dir]
    pace = ("" if not seconds_per_epoch
            else f", about {_duration(seconds_per_epoch * epochs)} of training at this run's pace")
    plural = "epoch" if config.epochs == 1 else "epochs"
    return (f"quick preset: {config.epochs} {plural} of the default recipe; for the full recipe run "
            f"`{shlex.join(argv)}` ({epochs} epochs{pace})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.task",
        description="Train, evaluate and export a CNN image classifier: TFDS datasets, MNIST-format IDX files, or a "
                    "folder of images with one subfolder per class.",
        formatter_class=HelpFormatter,
    )
    _add_data_flags(parser)
    _add_recipe_and_output_flags(parser)
    _add_distribution_flags(parser)
    return parser


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="mnist",
                      help="a TFDS image-classification name (mnist, fashion_mnist, cifar10, emnist/balanced, ...), "
                           "idx:FOLDER (local or gs://) holding the four MNIST-format IDX files, gzipped or not, or "
                           "folder:DIR holding one subfolder of images per class (docs/datasets.md)")
    data.add_argument("--image-size", type=image_size_flag, default=None, metavar="H[xW]",
                      help="folder: only: resize every image to this size (default: the most common size among "
                           "the images)")
    data.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                      help="mirror training images left-right when --augment is on (default: on for TFDS photo "
                           "datasets such as cifar10, off for digits, letters, MNIST-format data and folder: data)")
    data.add_argument("--data-dir", default=None,
                      help="TFDS data folder (default: $TFDS_DATA_DIR, else ~/tensorflow_datasets)")
    data.add_argument("--train-limit", type=int, default=None,
                      help="use at most this many training examples (before the validation split; default: all)")
    data.add_argument("--validation-fraction", type=float, default=0.1,
                      help="share of the (limited) training split held out for validation, seeded")
    data.add_argument("--class-names", default="auto",
                      help="auto (from TFDS, a folder's subfolder names, or 'fashion' when the idx folder name says "
                           "so), digits, fashion, or one comma-separated name per class")


def _add_recipe_and_output_flags(parser: argparse.ArgumentParser) -> None:
    """The recipe flags (unset ones come from --preset) and the output folders."""
    model = parser.add_argument_group("model and training (unset values come from --preset)")
    model.add_argument("--preset", choices=sorted(PRESETS), default="default",
                       help="seed: the seed notebook's exact recipe; default: this project's recipe, chosen "
                            f"by measurement; quick: the default recipe over {QUICK_EPOCHS} epochs (what `make train` "
                            "runs); each flag below shows the values")

    def recipe_flag(flag: str, help_text: str, **kwargs):
        key = flag[2:].replace("-", "_")
        model.add_argument(flag, default=None, help=help_text + _preset_values(key), **kwargs)

    recipe_flag("--epochs", "passes over the training split", type=int)
    recipe_flag("--batch-size", "global batch size, split across replicas", type=int)
    recipe_flag("--learning-rate", "Adam's (peak) learning rate", type=float)
    recipe_flag("--filters", "comma list of conv filter counts, one conv+pool block each", type=_positive_int_list)
    recipe_flag("--dense-units", "units of the hidden dense layer", type=int)
    recipe_flag("--dropout", "dropout rate before the output layer, in every epoch unless --unaugmented-dropout "
                "is given (the presets' values apply after the --unaugmented-epochs)", type=float)
    recipe_flag("--convs-per-block", "3x3 convolutions before each max-pool", type=int)
    recipe_flag("--padding", "conv padding (same keeps the image size through each block's convs)", choices=PADDINGS)
    recipe_flag("--batch-norm", "batch normalisation after each conv and the dense layer",
                action=argparse.BooleanOptionalAction)
    recipe_flag("--lr-schedule", "constant, or cosine decay to 0 over the run (after --warmup-epochs of linear "
                "warm-up)", choices=LR_SCHEDULES)
    recipe_flag("--warmup-epochs", "epochs of linear learning-rate warm-up from a tenth of the rate", type=float)
    recipe_flag("--augment", "training-time augmentation: random shifts of up to 2 pixels at 28x28, in proportion "
                "for other sizes (shift-flip: and horizontal flips, whatever the data; see --flip)",
                choices=AUGMENTATIONS)
    recipe_flag("--unaugmented-epochs", "the first N epochs train on the images as they are; --augment applies from "
                "epoch N+1 on, with --dropout, --label-smoothing and --weight-decay (plain images are learnt faster, "
                "augmented ones generalise better)", type=int)
    recipe_flag("--unaugmented-dropout", "dropout rate during the --unaugmented-epochs, which train without label "
                "smoothing or weight decay (default: --dropout if given, else the preset's)", type=float)
    recipe_flag("--label-smoothing", "train towards 1 - S on the true class and S/K spread over all K classes "
                "(0: the plain cross-entropy)", type=float)
    recipe_flag("--weight-decay", "decoupled weight decay (AdamW): each step shrinks the conv and dense kernels by "
                "W x the step's learning rate; biases and batch-norm scales and offsets are left alone (0: off)",
                type=float)
    model.add_argument("--seed", type=int, default=42, help="seeds weights, shuffling, dropout and the split")

    out = parser.add_argument_group("outputs (local paths or gs://; AIP_* variables are the defaults on Vertex AI)")
    out.add_argument("--job-dir", default=None,
                     help="root of all outputs (default: parent of AIP_MODEL_DIR, else ./runs/<UTC timestamp>)")
    out.add_argument("--model-dir", default=None, help="SavedModel folder (default: AIP_MODEL_DIR, else JOB_DIR/model)")
    out.add_argument("--log-dir", default=None,
                     help="TensorBoard folder (default: AIP_TENSORBOARD_LOG_DIR, else JOB_DIR/logs)")
    out.add_argument("--checkpoint-dir", default=None,
                     help="checkpoint folder (default: AIP_CHECKPOINT_DIR, else JOB_DIR/checkpoints)")
    out.add_argument("--no-resume", dest="resume", action="store_false",
                     help="start fresh even when the checkpoint folder holds a checkpoint (default: resume, and a "
                          "finished run is reported without rewriting its outputs)")
    out.add_argument("--hypertune", action="store_true",
                     help="report val_accuracy every epoch through cloudml-hypertune (Vertex AI tuning jobs; "
                          "on when CLOUD_ML_HP_METRIC_FILE is set)")
    model.add_argument("--hparams-file", default=None,
                       help="JSON of flag values (e.g. tuning's best_hyperparameters.json); explicit flags win")


def _add_distribution_flags(parser: argparse.ArgumentParser) -> None:
    dist = parser.add_argument_group("distribution")
    dist.add_argument("--strategy", choices=STRATEGIES, default="auto",
                      help="tf.distribute strategy; auto picks the best the machine offers")
    dist.add_argument("--tpu", default=None,
                      help="TPU name or 'local' (TPU VM, Colab); default: TPU_NAME, else a TPU attached to this host")
    dist.add_argument("--cpu-devices", type=int, default=0,
                      help="split the host CPU into N logical devices, so --strategy mirrored runs N replicas "
                           "without accelerators (a way to try distribution on a laptop)")
    dist.add_argument("--mixed-precision", choices=MIXED_PRECISION, default="auto",
                      help="auto: bf16 on TPU, fp16 (with loss scaling) on GPU, off on CPU; outputs stay float32")
    dist.add_argument("--jit-compile", choices=JIT_COMPILE, default="auto",
                      help="XLA-compile the train and predict steps: auto = implicit on TPU, on for GPU, off on "
                           "CPU (slower there, measured)")
    dist.add_argument("--intra-op-threads", type=int, default=0,
                      help="threads inside one op (0: all cores on a CPU-only host, else TensorFlow's choice)")
    dist.add_argument("--inter-op-threads", type=int, default=0,
                      help="ops run in parallel (0: 1 on a CPU-only host, else TensorFlow's choice)")
    dist.add_argument("--cluster-wait", type=float, default=600.0, metavar="SECONDS",
                      help="in a cluster, how long a worker waits for the others to start before it exits 1 "
                           "naming the missing ones (0: forever, as TensorFlow does)")
    dist.add_argument("--profile-steps", type=_step_range, default=None,
                      help="START,END: record a TensorFlow profile of these training steps into the log dir "
                           "(TensorBoard's Profile tab, with the tensorboard-plugin-profile package; default: off)")
    dist.add_argument("--steps-per-execution", type=int, default=20,
                      help="training steps run per tf.function call (fewer Python round trips; signals and "
                           "the progress bar are handled between calls)")


def default_job_dir(environ: Mapping[str, str], now: Optional[datetime.datetime] = None) -> str:
    """The parent of AIP_MODEL_DIR on Vertex AI, else ./runs/<UTC timestamp>."""
    model_dir = environ.get("AIP_MODEL_DIR")
    if model_dir:
        return posixpath.dirname(model_dir.rstrip("/"))
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return os.path.join("runs", now.strftime("%Y%m%d-%H%M%S"))


HPARAMS_FILE_LIMIT = 1024 * 1024  # read at most this much of --hparams-file (it could be /dev/zero)


def read_hparams_file(path: str) -> dict:
    """Flag values from a JSON file (keys are flag names with underscores); an I/O fault, so TrainerError."""
    import json

    from trainer.atomic import read_regular_file
    from trainer.errors import TrainerError

    try:
        data = read_regular_file(path, f"--hparams-file {path}", HPARAMS_FILE_LIMIT + 1)
        if len(data) > HPARAMS_FILE_LIMIT:
            raise TrainerError(f"--hparams-file {path}: larger than {HPARAMS_FILE_LIMIT // 2**20} MiB, so not a "
                               "file of flag values (best_hyperparameters.json is a few hundred bytes)")
        raw = json.loads(data.decode("utf-8"))
    except OSError as error:
        raise TrainerError(f"--hparams-file {path}: cannot read it ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise TrainerError(f"--hparams-file {path}: not valid JSON ({error})") from None
    except UnicodeDecodeError as error:
        raise TrainerError(f"--hparams-file {path}: not UTF-8 text (byte {error.start}); save it as UTF-8 JSON") \
            from None
    if not isinstance(raw, dict):
        raise TrainerError(f"--hparams-file {path}: expected a JSON object of flag values")
    unknown = sorted(set(raw) - set(HPARAM_KEYS))
    if unknown:
        raise TrainerError(f"--hparams-file {path}: unknown setting(s) {', '.join(unknown)}; "
                           f"known: {', '.join(sorted(HPARAM_KEYS))}")
    values = {}
    for key, value in raw.items():
        try:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            values[key] = HPARAM_KEYS[key](text)
        except (ValueError, argparse.ArgumentTypeError) as error:
            raise TrainerError(f"--hparams-file {path}: bad value for {key}: {value!r} ({error})") from None
    return values


def _config_from_args(args: argparse.Namespace, job_dir: str, environ: Mapping[str, str], recipe: dict) -> Config:
    """The Config of parsed flags, the environment's AIP_* folders and the `recipe` values."""
    return Config(
        job_dir=job_dir,
        dataset=args.dataset,
        data_dir=args.data_dir,
        train_limit=args.train_limit,
        validation_fraction=args.validation_fraction,
        seed=args.seed,
        preset=args.preset,
        # An explicit flag beats the AIP_* variable; both beat the job-dir sub-folder.
        model_dir=args.model_dir or environ.get("AIP_MODEL_DIR", ""),
        log_dir=args.log_dir or environ.get("AIP_TENSORBOARD_LOG_DIR", ""),
        checkpoint_dir=args.checkpoint_dir or environ.get("AIP_CHECKPOINT_DIR", ""),
        strategy=args.strategy,
        tpu=args.tpu,
        cpu_devices=args.cpu_devices,
        mixed_precision=args.mixed_precision,
        jit_compile=args.jit_compile,
        intra_op_threads=args.intra_op_threads,
        inter_op_threads=args.inter_op_threads,
        cluster_wait=args.cluster_wait,
        steps_per_execution=args.steps_per_execution,
        profile_steps=args.profile_steps,
        resume=args.resume,
        class_names=args.class_names,
        image_size=args.image_size,
        flip=args.flip,
        hypertune=args.hypertune or bool(environ.get("CLOUD_ML_HP_METRIC_FILE")),
        **recipe,
    )


def parse_config(argv: Optional[Sequence[str]], environ: Mapping[str, str]) -> Config:
    """Parse the command line into a Config; exits 2 (argparse style) on any syntax or range error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value in (("--job-dir", args.job_dir), ("--hparams-file", args.hparams_file)):
        if value is not None and not value.strip():
            parser.error(f"{flag} is empty; leave the flag out for its default")
    from trainer.storage import deadline_problem

    problem = deadline_problem(environ)
    if problem:
        parser.error(problem)
    preset = PRESETS[args.preset]
    from_file = read_hparams_file(args.hparams_file) if args.hparams_file else {}

    def recipe(fallback: dict) -> dict:
        """Each recipe setting: the flag if given, else the fallback's value, else None (Config fills in the
        preset's)."""
        return {key: getattr(args, key) if getattr(args, key) is not None else fallback.get(key) for key in preset}

    job_dir = args.job_dir or default_job_dir(environ)

    def build(values: dict) -> Config:
        return _config_from_args(args, job_dir, environ, values)

    try:
        return build(recipe(from_file))
    except ValueError as error:
        from_file_used = [key for key in from_file if key in preset and getattr(args, key) is None]
        if from_file_used:  # does the command line alone pass? then the file is the culprit (exit 1, not 2)
            from trainer.errors import TrainerError

            try:
                build(recipe({}))
            except ValueError:
                pass
            else:
                raise TrainerError(f"--hparams-file {args.hparams_file}: {error}") from None
        parser.error(str(error))
