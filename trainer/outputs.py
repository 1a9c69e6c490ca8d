"""Where one process writes: local folders, staged copies of gs:// folders, or a worker's scratch space.

TensorFlow writes only to local paths here. For a gs:// folder the trainer writes to a local staging
folder and syncs it through `trainer.storage`: TensorBoard events after every epoch, checkpoints after
every save (the `checkpoint` index last, deletions of the checkpoints' own files mirrored), and at the
end the model (atomically), plots and metrics.json (last). Non-chief workers write to scratch folders
that are deleted at the end.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Dict, List, Optional

from trainer import atomic, joblock, model_folder, storage
from trainer.config import Config, join_path
from trainer.errors import TrainerError

NAMES = ("job_dir", "model_dir", "log_dir", "checkpoint_dir")


@dataclasses.dataclass
class Outputs:
    job_dir: str
    model_dir: str
    log_dir: str
    checkpoint_dir: str
    is_chief: bool
    restore_dir: Optional[str]  # a local folder holding the checkpoints to resume from (None: start fresh)
    remote: Dict[str, str] = dataclasses.field(default_factory=dict)  # name -> gs:// URL (chief only)
    scratch: str = ""  # this process's temporary folder ("" when it writes straight to its outputs)
    lock: Optional[joblock.Lock] = None  # the chief's hold on the job dir
    folder_locks: List[joblock.Lock] = dataclasses.field(default_factory=list)  # its other output folders
    created: List[str] = dataclasses.field(default_factory=list)  # local folders this run made, outermost first

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.job_dir, "metrics.json")

    @property
    def plots_dir(self) -> str:
        return os.path.join(self.job_dir, "plots")

    def shown(self, name: str) -> str:
        """The user's path for an output (the gs:// URL when staged)."""
        return self.remote.get(name, getattr(self, name))

    def written_line(self) -> str:
        return (f"wrote {self.shown('model_dir')}, metrics.json and plots/ in {self.shown('job_dir')}, "
                f"logs in {self.shown('log_dir')}")

    def sync_logs(self) -> None:
        if "log_dir" in self.remote:
            storage.sync_up(self.log_dir, self.remote["log_dir"])

    def sync_checkpoints(self) -> None:
        """Upload the checkpoint folder; of the objects it no longer holds, delete only the checkpoints' own
        names (as --no-resume clears a local folder), never other objects under the gs:// folder."""
        from trainer.checkpoints import is_checkpoint_file

        if "checkpoint_dir" in self.remote:
            storage.sync_up(self.checkpoint_dir, self.remote["checkpoint_dir"], mirror_deletions=True,
                            last=("checkpoint",), deletable=is_checkpoint_file)

    def publish_model(self) -> None:
        if "model_dir" in self.remote:
            storage.publish_model(self.model_dir, self.remote["model_dir"])

    @property
    def model_summary_path(self) -> str:
        return os.path.join(self.job_dir, "model_summary.txt")

    def write_model_summary(self, lines: List[str]) -> str:
        """The chief keeps the model's layer table in the job dir; returns the headline to print."""
        if not self.is_chief:
            return lines[0]
        atomic.write_bytes(self.model_summary_path, ("\n".join(lines) + "\n").encode())
        if "job_dir" in self.remote:
            storage.upload_file(self.model_summary_path, f"{self.remote['job_dir'].rstrip('/')}/model_summary.txt")
        return f"{lines[0]}; layers in {join_path(self.shown('job_dir'), 'model_summary.txt')}"

    def publish_job_files(self) -> None:
        """Plots, then metrics.json last: its presence says the run finished."""
        if "job_dir" in self.remote:
            url = self.remote["job_dir"].rstrip("/")
            storage.sync_up(self.plots_dir, f"{url}/plots")
            storage.upload_file(self.metrics_path, f"{url}/metrics.json")

    def remove_unused_folders(self) -> None:
        """After a failed start: remove the folders this run created that are still empty (deepest first),
        so a run that never trained leaves no empty `runs/<timestamp>/` behind. Call after `close`."""
        for path in reversed(self.created):
            for root, _, _ in os.walk(path, topdown=False):
                try:
                    os.rmdir(root)  # only ever removes an empty folder
                except OSError:
                    pass

    def close(self) -> None:
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
        for folder_lock in reversed(self.folder_locks):
            folder_lock.release()
        self.folder_locks = []
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _new_folders(path: str) -> List[str]:
    """The folders `os.makedirs(path)` would create, outermost first."""
    missing: List[str] = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.insert(0, path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _make_dir(path: str, flag: str, created: Optional[List[str]] = None) -> None:
    if created is not None:
        created.extend(folder for folder in _new_folders(path) if folder not in created)
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-").close()
    except OSError as error:
        raise TrainerError(f"--{flag} {path}: cannot write there ({error.strerror or error})") from None


def _check_chief_outputs(config: Config) -> None:
    """Checks that need the file system: overlaps through symbolic links, and a model folder that export
    could only replace by deleting someone else's files."""
    from trainer.config import output_folders, output_overlap

    if not storage.is_gcs(config.job_dir):
        search = [name for name in ("search_settings.json", "keras_tuner") if os.path.exists(
            os.path.join(config.job_dir, name))]
        if search:
            raise TrainerError(f"--job-dir {config.job_dir}: holds a hyperparameter search ({', '.join(search)}), "
                               "whose logs/ this run would mix with its own; choose another --job-dir")
    overlap = output_overlap(output_folders(config),
                             lambda path: path if storage.is_gcs(path) else os.path.realpath(path))
    if overlap:
        raise TrainerError(overlap)
    # only a folder holding nothing but what an export writes (a publish cut short included) is replaced
    safe = (model_folder.is_exported_model(storage.list_objects(config.model_dir)) if storage.is_gcs(config.model_dir)
            else model_folder.is_model_folder(config.model_dir.rstrip("/") or "/"))
    if not safe:
        raise model_folder.foreign_model_dir(config.model_dir)
    if not storage.is_gcs(config.model_dir):
        model_folder.remove_export_debris(config.model_dir)


def _lock_local_folders(config: Config, local: Dict[str, str], held: List[joblock.Lock],
                        model: bool) -> None:
    """Lock the chief's local checkpoint and log folders (or, `model`, the model folder, from beside it),
    each once, so that a run with another --job-dir but one of these folders is refused."""
    def key(path: str) -> str:
        return os.path.realpath(path)

    taken = {key(lock.path) for lock in held if isinstance(lock, joblock.LocalLock)}
    taken.add(key(os.path.join(config.job_dir, joblock.LOCK_NAME)))
    names = ("model_dir",) if model else ("checkpoint_dir", "log_dir")
    for name in names:
        path = getattr(config, name)
        if storage.is_gcs(path) or path != local[name]:
            continue
        lock_path = joblock.sibling_lock_path(path) if model else os.path.join(path, joblock.LOCK_NAME)
        if key(lock_path) in taken:
            continue
        held.append(joblock.acquire_local_folder(path, f"--{name.replace('_', '-')}", beside=model))
        taken.add(key(lock_path))


def _lock_gcs_folders(config: Config, held: List[joblock.Lock]) -> None:
    """Lock the chief's gs:// checkpoint, log and model folders that lie outside a gs:// job dir (the job dir's
    lock covers those inside it), each with an object beside it, so that a run with another --job-dir but one
    of these folders is refused."""
    job_dir = config.job_dir.rstrip("/")
    inside = storage.is_gcs(job_dir)
    taken = set()
    for name in ("checkpoint_dir", "log_dir", "model_dir"):
        url = getattr(config, name).rstrip("/")
        if not storage.is_gcs(url) or (inside and (url == job_dir or url.startswith(job_dir + "/"))):
            continue
        lock_url = joblock.gcs_sibling_lock_url(url)
        if lock_url not in taken:
            held.append(joblock.acquire_gcs_folder(url, f"--{name.replace('_', '-')}"))
            taken.add(lock_url)


def prepare_outputs(config: Config, is_chief: bool = True, task_id: int = 0) -> Outputs:
    """Check and create every output now, so a bad path fails before data loads or training starts.

    The chief locks the job dir first (one writer per job dir, see trainer.joblock), then its other local
    output folders (checkpoint and log folders, the model folder from beside it); the locks are released
    by `Outputs.close`.
    """
    requested = {name: getattr(config, name) for name in NAMES}
    staged = not is_chief or any(storage.is_gcs(path) for path in requested.values())
    scratch = tempfile.mkdtemp(prefix=f"worker{task_id}-" if not is_chief else "mnist-trainer-staging-") \
        if staged else ""
    local, remote = {}, {}
    for name, path in requested.items():
        if not is_chief or storage.is_gcs(path):
            local[name] = os.path.join(scratch, name)
            if is_chief:
                remote[name] = path
        else:
            local[name] = path
    lock: Optional[joblock.Lock] = None
    folder_locks: List[joblock.Lock] = []
    created: List[str] = []
    try:
        for url in dict.fromkeys(remote.values()):
            storage.check_writable(url)
        for name in ("job_dir", "log_dir", "checkpoint_dir"):
            _make_dir(local[name], name.replace("_", "-"), None if scratch and local[name].startswith(scratch)
                      else created)
        if is_chief:
            lock = joblock.acquire(config.job_dir)
            _lock_local_folders(config, local, folder_locks, model=False)
            _lock_gcs_folders(config, folder_locks)
            _check_chief_outputs(config)
        _make_dir(os.path.dirname(os.path.abspath(local["model_dir"])), "model-dir",
                  None if scratch and local["model_dir"].startswith(scratch) else created)
        if is_chief:
            _lock_local_folders(config, local, folder_locks, model=True)
        restore_dir = None
        if config.resume:
            restore_dir = config.checkpoint_dir
            if storage.is_gcs(config.checkpoint_dir):  # every worker resumes from the chief's checkpoints
                restore_dir = local["checkpoint_dir"] if is_chief else os.path.join(scratch, "restore")
                storage.download_dir(config.checkpoint_dir, restore_dir)
    except BaseException:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        for folder_lock in reversed(folder_locks):
            folder_lock.release()
        if lock is not None:
            lock.release()
        Outputs(local["job_dir"], local["model_dir"], local["log_dir"], local["checkpoint_dir"], is_chief=is_chief,
                restore_dir=None, created=created).remove_unused_folders()
        raise
    return Outputs(local["job_dir"], local["model_dir"], local["log_dir"], local["checkpoint_dir"], is_chief=is_chief,
                   restore_dir=restore_dir, remote=remote, scratch=scratch, lock=lock, folder_locks=folder_locks,
                   created=created)
