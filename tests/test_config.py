"""Command-line parsing and validation: exit 2 with an argparse-style message, before any I/O."""

import dataclasses
import os
import subprocess
import sys

import pytest

from trainer.config import PRESETS, RESUME_KEYS, Config, full_recipe_hint, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(args, environ=None):
    return parse_config(args, environ or {})


@pytest.mark.parametrize("args, message", [
    (["--epochs", "-1"], "--epochs must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--dropout", "1.0"], "--dropout must be in [0, 1)"),
    (["--dropout", "-0.1"], "--dropout must be in [0, 1)"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--learning-rate", "0"], "--learning-rate must be a positive finite number"),
    (["--validation-fraction", "1.5"], "--validation-fraction must be in (0, 1)"),
    (["--filters", "32,x"], "argument --filters: expected comma-separated integers"),
    (["--filters", "32,0"], "argument --filters: every filter count must be a positive integer"),
    (["--dataset", "csv:/tmp/data"], "expected a TFDS name"),
    (["--dataset", "idx:"], "--dataset idx: needs a folder"),
    (["--strategy", "gpu"], "argument --strategy: invalid choice"),
    (["--train-limit", "1"], "--train-limit must be at least 2"),
    (["--class-names", "a"], "--class-names must be auto, digits, fashion or one comma-separated name per class"),
    (["--unaugmented-epochs", "-1"], "--unaugmented-epochs must be in [0, 1,000,000]"),
    (["--weight-decay", "-0.01"], "--weight-decay must be in [0, 1)"),
    (["--unaugmented-dropout", "1"], "--unaugmented-dropout must be in [0, 1)"),
    (["--weight-decay", "nan"], "--weight-decay must be in [0, 1)"),
])
def test_bad_flag_exits_2_naming_it(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.strip().splitlines()[-1].startswith("python -m trainer.task: error:")


def test_seed_preset_is_the_seed_notebook_recipe():
    config = parse(["--preset", "seed", "--job-dir", "/tmp/x"])
    assert (config.filters, config.dense_units, config.dropout) == ((32, 64), 128, 0.5)
    assert (config.learning_rate, config.batch_size) == (1e-3, 128)


def test_quick_preset_is_the_default_recipe_over_fewer_epochs():
    quick, default = parse(["--preset", "quick", "--job-dir", "/tmp/x"]), parse(["--job-dir", "/tmp/x"])
    assert default.epochs == 20 and 1 <= quick.epochs < default.epochs
    # every other recipe setting equal, so a quick run's checkpoint resumes under --preset default
    assert {key: getattr(quick, key) for key in RESUME_KEYS} == {key: getattr(default, key) for key in RESUME_KEYS}
    assert quick.lr_schedule == "cosine"  # decaying over the quick run's own epochs


def test_quick_run_ends_naming_the_full_recipe():
    config = parse(["--preset", "quick", "--dataset", "idx:/data/fashion", "--job-dir", "/tmp/x"])
    assert full_recipe_hint(config, 24.0) == (
        "quick preset: 3 epochs of the default recipe; for the full recipe run `python -m trainer.task --dataset "
        "idx:/data/fashion --job-dir /tmp/x-full` (20 epochs, about 8 min of training at this run's pace)")
    assert full_recipe_hint(parse(["--preset", "quick", "--job-dir", "/tmp/x"]), None).endswith(
        "run `python -m trainer.task --job-dir /tmp/x-full` (20 epochs)")


def test_the_full_recipe_hint_keeps_every_setting_but_the_epochs():
    config = parse(["--preset", "quick", "--epochs", "1", "--train-limit", "500", "--batch-size", "64",
                    "--no-batch-norm", "--seed", "7", "--job-dir", "/tmp/my runs/q"])
    hint = full_recipe_hint(config, 0.6)
    assert hint.startswith("quick preset: 1 epoch of the default recipe;")
    assert ("`python -m trainer.task --train-limit 500 --batch-size 64 --no-batch-norm --seed 7 "
            "--job-dir '/tmp/my runs/q-full'` (20 epochs, about 12 s of training at this run's pace)") in hint


def test_explicit_flags_beat_the_preset():
    config = parse(["--preset", "seed", "--filters", "16,32", "--dropout", "0.25", "--job-dir", "/tmp/x"])
    assert config.filters == (16, 32) and config.dropout == 0.25
    assert config.dense_units == PRESETS["seed"]["dense_units"]


def test_output_folders_default_under_the_job_dir():
    config = parse(["--job-dir", "/tmp/job"])
    assert (config.model_dir, config.log_dir, config.checkpoint_dir) == (
        "/tmp/job/model", "/tmp/job/logs", "/tmp/job/checkpoints")


def test_default_job_dir_is_a_utc_timestamp_under_runs():
    config = parse([])
    assert config.job_dir.startswith("runs" + os.sep) and len(os.path.basename(config.job_dir)) == 15


def test_vertex_ai_variables_are_the_defaults():
    environ = {"AIP_MODEL_DIR": "gs://bucket/job/model/", "AIP_TENSORBOARD_LOG_DIR": "gs://bucket/tb/",
               "AIP_CHECKPOINT_DIR": "gs://bucket/job/checkpoints/"}
    config = parse([], environ)
    assert config.job_dir == "gs://bucket/job"
    assert config.model_dir == "gs://bucket/job/model/"
    assert config.log_dir == "gs://bucket/tb/"
    assert config.checkpoint_dir == "gs://bucket/job/checkpoints/"


def test_explicit_flag_beats_the_vertex_variable():
    environ = {"AIP_MODEL_DIR": "gs://bucket/job/model/", "AIP_TENSORBOARD_LOG_DIR": "gs://bucket/tb/"}
    config = parse(["--log-dir", "/tmp/tb", "--job-dir", "/tmp/job"], environ)
    assert config.log_dir == "/tmp/tb"
    assert config.job_dir == "/tmp/job"
    assert config.model_dir == "gs://bucket/job/model/"


def test_config_is_frozen_and_validated_when_built_directly():
    with pytest.raises(ValueError, match="--dropout"):
        Config(job_dir="/tmp/x", dropout=1.0)
    config = Config(job_dir="/tmp/x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3


def test_help_is_instant_and_imports_no_tensorflow():
    code = ("import sys, contextlib, io\n"
            "from trainer import task\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n"
            "        task.main(['--help'])\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 0\n"
            "heavy = [m for m in ('tensorflow', 'keras', 'tensorflow_datasets', 'numpy') if m in sys.modules]\n"
            "print(heavy)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_hparams_file_values_fill_unset_flags_and_explicit_flags_win(tmp_path):
    path = tmp_path / "best.json"
    path.write_text('{"dropout": 0.3, "filters": [8, 16], "dense_units": 64}')
    config = parse(["--preset", "seed", "--hparams-file", str(path), "--dense-units", "32", "--job-dir", "/tmp/x"])
    assert (config.dropout, config.filters, config.dense_units) == (0.3, (8, 16), 32)
    assert config.epochs == PRESETS["seed"]["epochs"]


def test_out_of_range_hparams_file_value_is_one_line_naming_the_file_exit_1(tmp_path, capsys):
    from trainer.task import main

    path = tmp_path / "best.json"
    path.write_text('{"dropout": 1.5}')
    assert main(["--hparams-file", str(path), "--job-dir", str(tmp_path / "job")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --hparams-file {path}: --dropout must be in [0, 1), got 1.5"]


def test_bad_flag_next_to_a_good_hparams_file_is_still_a_usage_error(tmp_path, capsys):
    path = tmp_path / "best.json"
    path.write_text('{"dropout": 0.3}')
    with pytest.raises(SystemExit) as exit_:
        parse(["--hparams-file", str(path), "--epochs", "0", "--job-dir", "/tmp/x"])
    assert exit_.value.code == 2
    assert "--epochs must be at least 1" in capsys.readouterr().err


def _parsers_with_help():
    """Every command-line parser users meet (sub-commands included), with the module it belongs to."""
    import argparse

    from deploy.vertex import build_parser as vertex_parser
    from trainer.config import build_parser as trainer_parser
    from tuning.task import build_parser as tuning_parser

    def walk(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from walk(sub)

    for build in (trainer_parser, tuning_parser, vertex_parser):
        yield from walk(build())


def test_every_flag_has_help_and_no_doubled_or_misleading_default():
    import argparse

    checked = 0
    for parser in _parsers_with_help():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{name} has no help text"
            shown = formatter._get_help_string(action) % dict(vars(action), prog=parser.prog)
            assert shown.count("default:") <= 1, f"{name}: {shown}"
            for misleading in ("default: None", "default: True", "default: False"):
                assert misleading not in shown, f"{name}: {shown}"
            checked += 1
    assert checked > 60


def test_recipe_flags_say_their_values_come_from_the_preset():
    from trainer.config import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "--epochs EPOCHS passes over the training split (from --preset: default 20, quick 3, seed 10)" in text
    assert "--batch-norm, --no-batch-norm batch normalisation after each conv and the dense layer (from --preset: " \
           "default on, seed off)" in text
