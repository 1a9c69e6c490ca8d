"""Local <-> gs:// copies through google-cloud-storage.

TensorFlow's own gs:// filesystem cannot be pointed at an emulator, so the trainer writes everything
locally (a staging folder) and copies it here. Credentials are Application Default Credentials; with
STORAGE_EMULATOR_HOST set (fake-gcs-server in the tests) the client talks to that server anonymously.
Uploads are checked (crc32c by the client, then the stored size) and retried on transient errors.
Error messages name buckets and objects, never credentials or request URLs.
"""

from __future__ import annotations

import base64
import functools
import math
import os
import sys
import time
import uuid
from typing import Callable, Iterable, Mapping, Optional, Tuple

from trainer.errors import TrainerError

SUCCESS_MARKER = "_SUCCESS"


DEADLINE_VARIABLE = "MNIST_TRAINER_GCS_DEADLINE"
MAX_DEADLINE = 86400.0  # a day: beyond that a retry loop is a hang, not patience


def deadline_problem(environ: Mapping[str, str]) -> Optional[str]:
    """What is wrong with MNIST_TRAINER_GCS_DEADLINE in `environ` (None when unset or a usable number)."""
    text = environ.get(DEADLINE_VARIABLE)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_DEADLINE):
        return (f"{DEADLINE_VARIABLE}={text!r}: must be a number of seconds, more than 0 and at most "
                f"{MAX_DEADLINE:.0f} (a day); unset it for the default 60")
    return None


def _deadline_from_environment() -> float:
    if deadline_problem(os.environ):
        return 60.0  # never used: `call` refuses to run with the problem
    return max(3.0, float(os.environ.get(DEADLINE_VARIABLE, "60")))


# Requests go out without the client's own retry policy (which keeps retrying for two minutes and then
# raises an error quoting request URLs): `call` retries transient faults itself until DEADLINE seconds
# have passed, each request taking at most TIMEOUT, so an unreachable Cloud Storage is one line within
# DEADLINE seconds (60 by default; MNIST_TRAINER_GCS_DEADLINE changes it). The first retry of a request
# says so on stderr, so a wait never goes unexplained.
DEADLINE_PROBLEM = deadline_problem(os.environ)
DEADLINE = _deadline_from_environment()
TIMEOUT = min(20.0, DEADLINE / 3)


def is_gcs(path: Optional[str]) -> bool:
    return path is not None and path.startswith("gs://")


def split_url(url: str) -> Tuple[str, str]:
    """gs://bucket/a/b/ -> ("bucket", "a/b") ; the prefix has no leading or trailing slash."""
    if not is_gcs(url):
        raise ValueError(f"not a gs:// URL: {url}")
    bucket, _, prefix = url[len("gs://"):].partition("/")
    if not bucket:
        raise TrainerError(f"{url}: no bucket name")
    return bucket, prefix.strip("/")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


@functools.lru_cache(maxsize=1)
def client():
    """One client per process: ADC in the cloud, anonymous against STORAGE_EMULATOR_HOST."""
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials
        return storage.Client(project="emulator", credentials=AnonymousCredentials())
    import google.auth
    import google.auth.exceptions

    try:
        credentials, project = google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError:
        raise TrainerError("gs:// paths need Google Cloud credentials: run `gcloud auth application-default "
                           "login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file") from None
    return storage.Client(project=project or os.environ.get("GOOGLE_CLOUD_PROJECT"), credentials=credentials)


def _describe(error: Exception) -> str:
    """A fault's kind and HTTP status, without the request URL or any header."""
    code = getattr(error, "code", None)
    return f"{type(error).__name__}{f' {code}' if code else ''}"


def _transient_errors() -> tuple:
    import google.auth.exceptions
    import requests
    from google.api_core import exceptions

    return (exceptions.TooManyRequests, exceptions.InternalServerError, exceptions.BadGateway,
            exceptions.ServiceUnavailable, exceptions.GatewayTimeout, exceptions.RetryError, ConnectionError,
            TimeoutError,
            requests.exceptions.ConnectionError, requests.exceptions.Timeout,
            google.auth.exceptions.TransportError, _ChecksumMismatch)


def call(action, what: str, not_found: Optional[str] = None, passthrough: tuple = ()):
    """Run one Cloud Storage request: transient faults retried (with growing pauses) while DEADLINE
    allows another attempt, every other fault one TrainerError line.

    Exceptions in `passthrough` (e.g. PreconditionFailed for the job-dir lock) reach the caller as they are.
    """
    from google.api_core import exceptions

    if DEADLINE_PROBLEM:
        raise TrainerError(DEADLINE_PROBLEM)
    started, attempt = time.monotonic(), 0
    while True:
        attempt += 1
        try:
            return action()
        except passthrough:
            raise
        except exceptions.NotFound:
            raise TrainerError(not_found or f"{what}: not found") from None
        except _transient_errors() as error:
            pause = min(0.5 * 2 ** attempt, 8.0)
            if time.monotonic() - started + pause + TIMEOUT > DEADLINE:
                raise TrainerError(f"{what}: cannot reach Cloud Storage ({_describe(error)}; {attempt} attempts in "
                                   f"{time.monotonic() - started:.0f} s)") from None
            if attempt == 1:
                print(f"note: Cloud Storage: {what} failed ({_describe(error)}); retrying for up to "
                      f"{DEADLINE - (time.monotonic() - started):.0f} s ({DEADLINE_VARIABLE})", file=sys.stderr,
                      flush=True)
            time.sleep(pause)
        except exceptions.GoogleAPICallError as error:
            raise TrainerError(f"{what}: {_describe(error)}") from None



class _ChecksumMismatch(Exception):
    pass


def _crc32c(path: str) -> str:
    import google_crc32c

    checksum = google_crc32c.Checksum()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            checksum.update(block)
    return base64.b64encode(checksum.digest()).decode()


def check_writable(url: str) -> None:
    """Fail fast (before training) on a missing bucket, missing credentials or no write permission."""
    from google.api_core import exceptions

    bucket_name, prefix = split_url(url)
    probe = client().bucket(bucket_name).blob(_join(prefix, f".write-test-{uuid.uuid4().hex}"))

    def write_and_delete():
        probe.upload_from_string(b"", retry=None, timeout=TIMEOUT)
        probe.delete(retry=None, timeout=TIMEOUT)

    try:
        call(write_and_delete, url, not_found=f"gs://{bucket_name}: bucket does not exist (create it, or fix the "
                                             f"path {url})", passthrough=(exceptions.Forbidden,))
    except exceptions.Forbidden:
        raise TrainerError(f"{url}: no permission to write objects in bucket {bucket_name}") from None


def read_bytes(url: str) -> Optional[bytes]:
    """The content of one object, or None when it does not exist."""
    from google.api_core import exceptions

    bucket_name, name = split_url(url)
    blob = client().bucket(bucket_name).blob(name)
    try:
        return call(lambda: blob.download_as_bytes(retry=None, timeout=TIMEOUT), f"reading {url}",
                    passthrough=(exceptions.NotFound,))
    except exceptions.NotFound:
        return None


def read_text(url: str) -> Optional[str]:
    data = read_bytes(url)
    return None if data is None else data.decode("utf-8", errors="replace")


def upload_file(local_path: str, url: str) -> None:
    """Copy one file; crc32c checked by the client, size checked after, transient faults retried."""
    bucket_name, name = split_url(url)
    blob = client().bucket(bucket_name).blob(name)
    size = os.path.getsize(local_path)

    def upload():
        blob.upload_from_filename(local_path, checksum="crc32c", retry=None, timeout=TIMEOUT)
        blob.reload(retry=None, timeout=TIMEOUT)
        if blob.size != size:
            raise _ChecksumMismatch(f"stored {blob.size} bytes, expected {size}")

    call(upload, f"upload to {url}")


def _local_files(folder: str) -> Iterable[str]:
    for root, _, files in os.walk(folder):
        for name in files:
            yield os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")


def list_objects(url: str) -> dict:
    """{relative name: blob} under a gs:// folder."""
    bucket_name, prefix = split_url(url)
    folder = prefix + "/" if prefix else ""
    blobs = call(lambda: list(client().list_blobs(bucket_name, prefix=folder, retry=None, timeout=TIMEOUT)),
                 f"listing {url}",
                      not_found=f"gs://{bucket_name}: bucket does not exist (from {url})")
    return {blob.name[len(folder):]: blob for blob in blobs if not blob.name.endswith("/")}


def is_lock_name(name: str) -> bool:
    """A lock object's name (trainer.joblock's `.lock` and `.NAME.lock`), by its last part."""
    base = name.rsplit("/", 1)[-1]
    return base == ".lock" or (base.startswith(".") and base.endswith(".lock"))


def sync_up(local_dir: str, url: str, mirror_deletions: bool = False, last: Iterable[str] = (),
            deletable: Callable[[str], bool] = lambda name: True) -> None:
    """Upload new or changed files (by crc32c); files named in `last` go after the rest, then deletions
    (with `mirror_deletions`: the objects the local folder no longer holds whose names `deletable` accepts)."""
    remote = list_objects(url)
    local = sorted(_local_files(local_dir), key=lambda name: name in set(last))
    for name in local:
        path = os.path.join(local_dir, name)
        blob = remote.get(name)
        if blob is None or blob.size != os.path.getsize(path) or blob.crc32c != _crc32c(path):
            upload_file(path, f"{url.rstrip('/')}/{name}")
    if mirror_deletions:  # a run's locks (the job dir's .lock, a folder's .NAME.lock) are not the sync's to delete
        for name in {name for name in remote if not is_lock_name(name) and deletable(name)} - set(local):
            call(functools.partial(remote[name].delete, retry=None, timeout=TIMEOUT),
                 f"deleting {url.rstrip('/')}/{name}")


def download_dir(url: str, local_dir: str, mirror: bool = False) -> int:
    """Copy every object under a gs:// folder into local_dir, skipping files already equal (crc32c);
    with `mirror`, local files the bucket no longer holds are removed. Returns the count of objects
    copied or already equal (one deleted between the listing and its download is not counted)."""
    from google.api_core import exceptions

    objects = list_objects(url)
    for name, blob in list(objects.items()):
        if any(part in ("", ".", "..") for part in name.split("/")):
            raise TrainerError(f"{url.rstrip('/')}/{name}: an object name that would leave the download folder")
        path = os.path.join(local_dir, *name.split("/"))
        if os.path.isfile(path) and os.path.getsize(path) == blob.size and _crc32c(path) == blob.crc32c:
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.partial-{os.getpid()}"
        try:
            call(functools.partial(blob.download_to_filename, partial, checksum="crc32c", retry=None, timeout=TIMEOUT),
                 f"download of {url.rstrip('/')}/{name}", passthrough=(exceptions.NotFound,))
        except exceptions.NotFound:
            # Deleted after the listing (another process's write probe, or a checkpoint its writer just
            # rotated out): the folder no longer holds it, so neither does the copy.
            if os.path.exists(partial):
                os.remove(partial)
            del objects[name]
            continue
        os.replace(partial, path)
    if mirror:
        for name in set(_local_files(local_dir)) - set(objects):
            if ".partial-" not in name:  # another process's download in progress
                os.remove(os.path.join(local_dir, *name.split("/")))
    return len(objects)


def publish_model(local_dir: str, url: str) -> None:
    """Put a finished model folder at `url` so that a reader who waits for `_SUCCESS` never sees half of it.

    Cloud Storage has no rename: the files go to a temporary prefix `MODEL.partial-*` first (an
    interrupted upload leaves the old model and its `_SUCCESS` untouched), then `_SUCCESS` is removed,
    the files are copied server-side into place, stale objects are deleted and `_SUCCESS` is written
    last. Between the removal and the new `_SUCCESS` (seconds: server-side copies) the folder may mix
    old and new files. Temporary prefixes left by an earlier interrupted publish are removed first.
    """
    bucket_name, prefix = split_url(url)
    bucket = client().bucket(bucket_name)
    remove_partial_uploads(url)
    staged_url = f"gs://{bucket_name}/{prefix}.partial-{uuid.uuid4().hex[:8]}"
    try:
        sync_up(local_dir, staged_url)
        staged = list_objects(staged_url)
        marker = bucket.blob(_join(prefix, SUCCESS_MARKER))
        call(lambda: marker.exists(retry=None, timeout=TIMEOUT) and marker.delete(retry=None, timeout=TIMEOUT),
             f"removing {url}/{SUCCESS_MARKER}")
        for name, blob in staged.items():
            call(lambda blob=blob, name=name: bucket.copy_blob(blob, bucket, _join(prefix, name), retry=None,
                                                                timeout=TIMEOUT),
                 f"copying {name} into {url}")
        for name, blob in list_objects(url).items():
            if name not in staged and name != SUCCESS_MARKER:
                call(lambda blob=blob: blob.delete(retry=None, timeout=TIMEOUT), f"deleting stale {url}/{name}")
        call(lambda: marker.upload_from_string(b"", retry=None, timeout=TIMEOUT), f"writing {url}/{SUCCESS_MARKER}")
    finally:
        _delete_quietly(staged_url)


def remove_partial_uploads(url: str) -> None:
    """Delete `MODEL.partial-*` objects that an interrupted earlier publish of `url` left behind."""
    bucket_name, prefix = split_url(url)
    blobs = call(lambda: list(client().list_blobs(bucket_name, prefix=f"{prefix}.partial-", retry=None,
                                                  timeout=TIMEOUT)), f"listing {url}.partial-*")
    for blob in blobs:
        call(lambda blob=blob: blob.delete(retry=None, timeout=TIMEOUT), f"deleting the leftover {blob.name}")


def _delete_quietly(url: str) -> None:
    """Best-effort removal of a temporary prefix (after success, or after a failure that gets reported)."""
    try:
        for blob in list_objects(url).values():
            blob.delete(retry=None, timeout=TIMEOUT)
    except Exception:
        pass


def cached_copy(url: str, cache_root: Optional[str] = None) -> str:
    """A local copy of a gs:// folder (e.g. an idx: dataset), checked against the bucket on every call:
    changed objects are fetched again and deleted ones removed, so the copy never goes stale. An
    unreachable bucket is a TrainerError (never a silent use of the cache)."""
    bucket_name, prefix = split_url(url)
    cache_root = cache_root or os.environ.get("MNIST_TRAINER_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "mnist-trainer")
    local = os.path.join(cache_root, "gcs", bucket_name, *[part for part in prefix.split("/") if part])
    try:
        os.makedirs(local, exist_ok=True)
    except OSError as error:
        source = "MNIST_TRAINER_CACHE" if os.environ.get("MNIST_TRAINER_CACHE") == cache_root else "the cache folder"
        raise TrainerError(f"{source} {cache_root}: cannot keep the copy of {url} there ({error.strerror}); "
                           "point it at a folder") from None
    if download_dir(url, local, mirror=True) == 0:
        raise TrainerError(f"{url}: no objects there (or the bucket does not exist)")
    return local
