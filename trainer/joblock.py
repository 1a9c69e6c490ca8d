"""One writer per job dir: a lock that a second trainer run or search into the same folder is refused by.

A local job dir is locked with an OS file lock (`flock`) on `JOB_DIR/.lock`: the kernel drops it when the
process ends, so even a `kill -9` never leaves a job dir locked. A gs:// job dir is locked with an object
`JOB_DIR/.lock` created only if absent (a generation precondition, so two runs cannot both create it). It
holds the owner and a heartbeat the owner refreshes every minute. A lock left by a run that died is
taken over at once when its process is gone from this very host or when a restarted replica of the same
Vertex AI job finds it, and by anyone once its heartbeat is older than `STALE_SECONDS`. The lock is
released (the file or object deleted) at the end.
"""

from __future__ import annotations

import datetime
import errno
import functools
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Mapping, Optional, Union

from trainer import storage
from trainer.errors import TrainerError

LOCK_NAME = ".lock"
HEARTBEAT_SECONDS = 60
STALE_SECONDS = 600


def _owner(environ: Mapping[str, str]) -> dict:
    """Who holds the lock, for the refusal message; `replica` identifies a Vertex AI job's replica."""
    replica = None
    if environ.get("CLOUD_ML_JOB_ID"):
        try:
            task = json.loads(environ.get("CLUSTER_SPEC") or "{}").get("task", {})
        except (ValueError, AttributeError):
            task = {}
        replica = f"{environ['CLOUD_ML_JOB_ID']}/{task.get('type', 'workerpool0')}/{task.get('index', 0)}"
    return dict(host=socket.gethostname(), pid=os.getpid(), started=_now(), heartbeat=time.time(),
                token=uuid.uuid4().hex,
                command=" ".join(os.path.basename(arg) if index == 0 else arg for index, arg in enumerate(sys.argv)),
                replica=replica)


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe(owner: dict) -> str:
    if not owner:
        return "a run that is starting"
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"


def _refusal(flag: str, job_dir: str, owner: dict) -> TrainerError:
    return TrainerError(f"{flag} {job_dir}: another run is writing there ({describe(owner)}); wait for it to end "
                        "or choose another folder")


class LocalLock:
    """`flock` on JOB_DIR/.lock; the file records the owner and is removed on release."""

    def __init__(self, job_dir: str, flag: str, environ: Mapping[str, str], path: Optional[str] = None):
        import fcntl

        self.path = path or os.path.join(job_dir, LOCK_NAME)
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                handle.seek(0)
                text = handle.read()
                handle.close()
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise _refusal(flag, job_dir, _parse(text)) from None
                # A file system without locks (some network and FUSE mounts): go on unlocked, and say so.
                print(f"note: {flag} {job_dir}: cannot lock it on this file system ({error.strerror}); make sure "
                      "no other run writes there", file=sys.stderr)
                self.handle = None
                return
            try:
                same = os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the holder released (and deleted) the file between our open and flock: retry
                break
            handle.close()
        handle.truncate(0)
        handle.write(json.dumps(_owner(environ)))
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            try:
                os.remove(self.path)  # while still holding it, so a waiter sees a new file next time
            except OSError:
                pass
            self.handle.close()
            self.handle = None


def _parse(text) -> dict:
    try:
        owner = json.loads(text)
        return owner if isinstance(owner, dict) else {}
    except (TypeError, ValueError):
        return {}


class GcsLock:
    """A `.lock` object created with `if_generation_match=0`, refreshed by a heartbeat thread: JOB_DIR/.lock,
    or the object `lock_url` names (the lock of another output folder, see `acquire_gcs_folder`)."""

    def __init__(self, job_dir: str, flag: str, environ: Mapping[str, str], lock_url: Optional[str] = None):
        from google.api_core import exceptions

        bucket_name, prefix = storage.split_url(lock_url or job_dir)
        name = prefix if lock_url else (f"{prefix}/{LOCK_NAME}" if prefix else LOCK_NAME)
        self.blob = storage.client().bucket(bucket_name).blob(name)
        self.owner = _owner(environ)
        self.generation = 0
        try:
            self._write(if_generation_match=0)
        except exceptions.PreconditionFailed:
            held, generation = self._read()
            if held.get("token") == self.owner["token"]:  # our create went through, its reply was lost
                self.generation = generation
                held = None
            taken_over = held is None or (time.time() - float(held.get("heartbeat", 0)) > STALE_SECONDS
                          or (self.owner["replica"] and held.get("replica") == self.owner["replica"])
                          or (held.get("host") == self.owner["host"] and not process_alive(int(held.get("pid", 0)))))
            if not taken_over:
                raise _refusal(flag, job_dir, held) from None
            if held is not None:
                try:
                    self._write(if_generation_match=generation)
                except exceptions.PreconditionFailed:  # someone else took it over first
                    raise _refusal(flag, job_dir, self._read()[0]) from None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="job-dir-lock-heartbeat", daemon=True)
        self._thread.start()

    def _write(self, if_generation_match: int) -> None:
        from google.api_core import exceptions

        self.owner["heartbeat"] = time.time()
        storage.call(functools.partial(self.blob.upload_from_string, json.dumps(self.owner),
                                       if_generation_match=if_generation_match, retry=None, timeout=storage.TIMEOUT),
                     f"locking {self.blob.name}", passthrough=(exceptions.PreconditionFailed,))
        self.generation = self.blob.generation

    def _read(self):
        from google.api_core import exceptions

        try:
            text = storage.call(lambda: self.blob.download_as_bytes(retry=None, timeout=storage.TIMEOUT),
                                f"reading {self.blob.name}", passthrough=(exceptions.NotFound,))
        except exceptions.NotFound:
            return {}, 0
        return _parse(text), self.blob.generation

    def _beat(self) -> None:
        """Refresh every HEARTBEAT_SECONDS; transient faults are retried at the next beat (the lock goes
        stale only after STALE_SECONDS without a refresh). Stops for good only when taken over."""
        from google.api_core import exceptions

        warned = False
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._write(if_generation_match=self.generation)
                warned = False
            except exceptions.PreconditionFailed:
                print(f"warning: the lock {self.blob.name} was taken over by another run; this run's outputs there "
                      "may be overwritten", file=sys.stderr)
                return
            except Exception as error:  # Cloud Storage unreachable for now: say so once, keep trying
                if not warned:
                    print(f"warning: could not refresh the lock {self.blob.name} ({type(error).__name__}); "
                          "retrying", file=sys.stderr)
                    warned = True

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=storage.TIMEOUT + 1)  # no refresh in flight while we delete
        try:  # best effort, briefly: after an outage the run is ending with its error line already decided
            self.blob.delete(if_generation_match=self.generation, retry=None, timeout=min(5.0, storage.TIMEOUT))
        except Exception:
            pass  # gone, taken over or unreachable: a stale lock is taken over after STALE_SECONDS


Lock = Union[LocalLock, GcsLock]


def acquire(job_dir: str, flag: str = "--job-dir", environ: Optional[Mapping[str, str]] = None) -> Lock:
    """Lock `job_dir` (which must exist when local) for this process, or raise TrainerError naming the holder."""
    environ = os.environ if environ is None else environ
    if storage.is_gcs(job_dir):
        return GcsLock(job_dir, flag, environ)
    return LocalLock(job_dir, flag, environ)


def gcs_sibling_lock_url(url: str) -> str:
    """The lock object of a gs:// output folder other than the job dir: `.NAME.lock` beside the folder, where
    neither the folder's own sync (which deletes objects it did not write) nor a model's replacement touches
    it; a bucket's root folder has `.lock` in it (syncs leave lock names alone)."""
    bucket_name, prefix = storage.split_url(url)
    if not prefix:
        return f"gs://{bucket_name}/{LOCK_NAME}"
    parent, _, base = prefix.rpartition("/")
    return f"gs://{bucket_name}/{parent + '/' if parent else ''}.{base}{LOCK_NAME}"


def acquire_gcs_folder(url: str, flag: str, environ: Optional[Mapping[str, str]] = None) -> GcsLock:
    """Lock one more gs:// output folder of a run (checkpoint, log or model folder outside its job dir), so that a
    second run writing there through another --job-dir is refused (the lock object sits beside the folder)."""
    environ = os.environ if environ is None else environ
    return GcsLock(url, flag, environ, lock_url=gcs_sibling_lock_url(url))


def sibling_lock_path(folder: str) -> str:
    """The lock of a folder that is replaced as a whole (a model folder): `.NAME.lock` next to it."""
    folder = os.path.abspath(folder)
    return os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}{LOCK_NAME}")


def acquire_local_folder(folder: str, flag: str, beside: bool = False,
                         environ: Optional[Mapping[str, str]] = None) -> LocalLock:
    """Lock one more local output folder of a run (its checkpoint, log or model folder), so that a second run
    writing there through another --job-dir is refused too; `beside`: lock it from next to the folder."""
    environ = os.environ if environ is None else environ
    return LocalLock(folder, flag, environ, path=sibling_lock_path(folder) if beside else None)
