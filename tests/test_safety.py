"""Nothing a user has is lost or silently replaced: overlapping output folders, two runs in one job dir,
a diverging run, and an export killed part-way. Real trainer runs on the real digits; the kill is a real
SIGKILL of a real trainer process. (gs:// locks, stale data caches and leftover uploads: test_cloud.py.)"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT_DIR, file_snapshot, run_task, start_cli, trainer_env, wait_for_line


def _user_files(root):
    """A job dir that an earlier run filled, plus a user's own file next to it."""
    for relative, text in (("run/checkpoints/checkpoint", "ckpt"), ("run/logs/train/events", "events"),
                           ("run/metrics.json", "{}"), ("precious/notes.txt", "keep me")):
        path = os.path.join(root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(text)


@pytest.mark.parametrize("flags, culprits", [
    (["--job-dir", "{x}/run", "--model-dir", "{x}/run"], ("--job-dir", "--model-dir")),
    (["--job-dir", "{x}/run", "--model-dir", "{x}"], ("--job-dir", "--model-dir")),
    (["--job-dir", "{x}/run", "--model-dir", "{x}/run/checkpoints"], ("--model-dir", "--checkpoint-dir")),
    (["--job-dir", "{x}/run", "--model-dir", "{x}/m", "--checkpoint-dir", "{x}/m/"],
     ("--model-dir", "--checkpoint-dir")),
    (["--job-dir", "{x}/run", "--log-dir", "{x}/run/model/logs"], ("--model-dir", "--log-dir")),
    (["--job-dir", "{x}/run", "--checkpoint-dir", "{x}"], ("--job-dir", "--checkpoint-dir")),
])
def test_overlapping_output_folders_are_refused_before_anything_is_touched(flags, culprits, tmp_path):
    _user_files(str(tmp_path))
    before = file_snapshot(str(tmp_path))
    code, out, err = run_task(["--dataset", "idx:/nowhere"] + [flag.format(x=tmp_path) for flag in flags])
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert all(culprit in last for culprit in culprits), last
    assert "own folder" in last and out == ""
    assert file_snapshot(str(tmp_path)) == before


def test_overlap_through_a_symbolic_link_is_refused_too(digits_idx, tmp_path):
    _user_files(str(tmp_path))
    os.symlink(tmp_path / "run", tmp_path / "link")
    before = file_snapshot(str(tmp_path / "run"))
    code, out, err = run_task(["--dataset", f"idx:{digits_idx}", "--job-dir", str(tmp_path / "run"),
                               "--model-dir", str(tmp_path / "link")])
    assert code == 1, err
    assert "--model-dir" in err and "is the same folder as" in err and "epoch" not in out
    assert file_snapshot(str(tmp_path / "run")) == before


def test_a_model_dir_holding_other_files_is_refused_and_kept(digits_idx, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    code, out, err = run_task(["--dataset", f"idx:{digits_idx}", "--job-dir", str(tmp_path / "run"),
                               "--model-dir", str(tmp_path / "mine")])
    assert code == 1
    assert err.strip().splitlines()[-1].startswith(f"error: --model-dir {tmp_path / 'mine'}: holds files that are not")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work" and "epoch" not in out


def test_non_finite_numbers_are_refused_up_front(tmp_path):
    code, _, err = run_task(["--learning-rate", "inf", "--job-dir", str(tmp_path / "a")])
    assert code == 2 and "--learning-rate must be a positive finite number, got inf" in err
    hparams = tmp_path / "best.json"
    hparams.write_text('{"learning_rate": Infinity}')
    code, _, err = run_task(["--hparams-file", str(hparams), "--job-dir", str(tmp_path / "b")])
    assert code == 1 and err.strip().splitlines()[-1].startswith(f"error: --hparams-file {hparams}: --learning-rate")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_diverging_run_exits_1_and_never_replaces_a_good_model(seed_run, digits_idx, tmp_path):
    import shutil

    good_job, _, _ = seed_run
    model_dir = str(tmp_path / "served")
    shutil.copytree(os.path.join(good_job, "model"), model_dir)
    before = file_snapshot(model_dir)
    job_dir = str(tmp_path / "diverged")
    code, out, err = run_task(["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--train-limit", "1000",
                               "--epochs", "2", "--learning-rate", "1e30", "--job-dir", job_dir,
                               "--model-dir", model_dir])
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: training diverged: training loss") and "--learning-rate 1e+30" in last, err
    assert "epoch 1, steps 1-" in last and "Traceback" not in err
    assert file_snapshot(model_dir) == before, "the good model must stay exactly as it was"
    assert not os.path.exists(os.path.join(job_dir, "metrics.json"))
    assert not [name for name in os.listdir(tmp_path) if ".partial-" in name]


@pytest.mark.slow
def test_one_writer_per_job_dir_and_a_killed_holder_frees_it(digits_idx, tmp_path):
    """The holder is given far more epochs than the test lasts, so it still holds the job dir however fast or
    loaded the machine is; after its kill a one-epoch fresh run takes the job dir."""
    job_dir = str(tmp_path / "job")
    data = ["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--train-limit", "1500", "--batch-size", "16",
            "--job-dir", job_dir]
    args = [*data, "--epochs", "200"]
    holder = start_cli(args, str(tmp_path / "holder.log"))
    try:
        wait_for_line(str(tmp_path / "holder.log"), "dataset ", holder)
        code, out, err = run_task(args)
        assert code == 1 and out == ""
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"error: --job-dir {job_dir}: another run is writing there (pid {holder.pid} on "), last
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert holder.returncode == -signal.SIGKILL, "the holder was still training when it was killed"
    code, out, err = run_task([*data, "--epochs", "1", "--no-resume"])  # the kernel dropped the dead holder's lock
    assert code == 0, err
    assert not os.path.exists(os.path.join(job_dir, ".lock")), "the lock file is removed at the end"


@pytest.mark.slow
def test_a_run_after_a_kill_during_export_leaves_no_debris(digits_idx, tmp_path):
    """The trainer is killed (SIGKILL) while its model is being staged beside the job dir's model/."""
    job_dir = tmp_path / "job"
    args = ["--dataset", f"idx:{digits_idx}", "--preset", "seed", "--train-limit", "800", "--epochs", "1",
            "--job-dir", str(job_dir)]
    process = subprocess.Popen([sys.executable, "-m", "trainer.task", *args], cwd=ROOT_DIR, env=trainer_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    staged = []
    while not staged and process.poll() is None and time.monotonic() < deadline:
        staged = [n for n in (os.listdir(job_dir) if job_dir.is_dir() else []) if n.startswith(".model.partial-")]
        time.sleep(0.002)
    process.kill()
    process.wait(timeout=30)
    assert staged, "the trainer finished or failed before its export was seen (the test could not kill it)"
    assert [n for n in os.listdir(job_dir) if n.startswith(".model.partial-")], "the kill left a staging folder"

    code, out, err = run_task(args)  # resumes after the saved epoch: nothing to train, exports again
    assert code == 0, err
    assert not [n for n in os.listdir(job_dir) if ".partial-" in n or ".replaced-" in n]
    assert os.path.isfile(job_dir / "model" / "saved_model.pb")
    with open(job_dir / "metrics.json") as handle:
        assert json.load(handle)["epochs_completed"] == 1


def test_debris_cleanup_touches_only_what_an_export_left(tmp_path):
    """Dead-process staging and swapped-out folders go; a user's look-alike backups stay."""
    from trainer import model_folder

    for name in (".model.partial-999999-abcd1234", ".model.replaced-999998", "model.old-20240601",
                 ".model.replaced-999997", "model"):
        (tmp_path / name).mkdir()
    (tmp_path / ".model.replaced-999998" / "saved_model.pb").write_bytes(b"old export")
    (tmp_path / ".model.replaced-999997" / "notes.txt").write_text("not an export")
    (tmp_path / "model.old-20240601" / "saved_model.pb").write_bytes(b"the user's backup")
    removed = model_folder.remove_export_debris(str(tmp_path / "model"))
    assert removed == [".model.partial-999999-abcd1234", ".model.replaced-999998"]
    assert sorted(os.listdir(tmp_path)) == [".model.replaced-999997", "model", "model.old-20240601"]
