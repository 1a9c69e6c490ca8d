"""Resolve a tf.distribute strategy by name, once, and say whether this process is the chief.

Names: auto | default | one_device | mirrored | multi_worker | tpu. `auto` picks a TPU when one is
attached (one named by --tpu or TPU_NAME must answer: else one line, never a silent fall-back to the CPU),
else multi_worker when TF_CONFIG or Vertex AI's CLUSTER_SPEC lists several tasks, else
mirrored over two or more GPUs, else the default strategy. A strategy the machine cannot provide is a
TrainerError with one clear line. Host settings (logical CPU devices, threads) are process-wide and must
be applied by `configure_host` before TensorFlow runs its first op.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import socket
import threading
import time
from typing import Any, List, Mapping, Optional, Tuple

from trainer.config import Config
from trainer.errors import Interrupted, TrainerError

# Vertex AI worker pools, in CLUSTER_SPEC order, as TF_CONFIG task types.
VERTEX_POOLS = {"workerpool0": "chief", "workerpool1": "worker", "workerpool2": "ps", "workerpool3": "evaluator"}


@dataclasses.dataclass
class Resolved:
    strategy: Any
    name: str  # as resolved: "default" when "auto" was asked on a plain CPU machine
    is_chief: bool = True
    task_type: Optional[str] = None
    task_id: int = 0
    num_workers: int = 1

    @property
    def num_replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)


def configure_host(cpu_devices: int = 0, intra_op_threads: int = 0, inter_op_threads: int = 0) -> None:
    """Split the CPU into logical devices and set thread pools; these are fixed once TensorFlow starts.

    Explicit settings that can no longer be applied are a TrainerError; the CPU thread defaults are
    simply skipped then (a second run in the same process keeps the first run's pools).
    """
    import tensorflow as tf

    threading = tf.config.threading
    # Measured on a 2-core CPU: one inter-op thread and every core inside each op beat
    # TensorFlow's own choice by about 5% for this model; with GPUs TensorFlow keeps its choice.
    cpu_only = not tf.config.list_physical_devices("GPU")
    wanted = [(intra_op_threads or (os.cpu_count() or 1 if cpu_only else 0), bool(intra_op_threads),
               threading.get_intra_op_parallelism_threads, threading.set_intra_op_parallelism_threads),
              (inter_op_threads or (1 if cpu_only else 0), bool(inter_op_threads),
               threading.get_inter_op_parallelism_threads, threading.set_inter_op_parallelism_threads)]
    for value, explicit, getter, setter in wanted:
        if not value or getter() == value:
            continue
        try:
            setter(value)
        except RuntimeError as error:
            if explicit:
                raise TrainerError(f"--intra-op-threads/--inter-op-threads must be set before TensorFlow "
                                   f"starts ({error}); run the trainer in a fresh process") from None
    cpu = tf.config.list_physical_devices("CPU")[0]
    configured = tf.config.get_logical_device_configuration(cpu)  # does not start the runtime
    if cpu_devices > 1 and len(configured or ()) != cpu_devices:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(cpu_devices)])
        except RuntimeError as error:
            raise TrainerError(f"--cpu-devices must be set before TensorFlow starts ({error}); run the "
                               "trainer in a fresh process") from None


def cluster_config(environ: Mapping[str, str]) -> Optional[dict]:
    """TF_CONFIG, or one derived from Vertex AI's CLUSTER_SPEC; None when either names a single task."""
    raw, source = environ.get("TF_CONFIG"), "TF_CONFIG"
    if not raw:
        raw, source = environ.get("CLUSTER_SPEC"), "CLUSTER_SPEC"
    if not raw:
        return None
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as error:
        raise TrainerError(f"{source} is not valid JSON ({error})") from None
    check_cluster_shape(spec, source)
    if source == "CLUSTER_SPEC":
        cluster = {VERTEX_POOLS.get(pool, pool): hosts for pool, hosts in spec.get("cluster", {}).items() if hosts}
        task = spec.get("task", {})
        spec = {"cluster": cluster, "task": {"type": VERTEX_POOLS.get(task.get("type"), task.get("type")),
                                             "index": int(task.get("index", 0))}}
    return spec if len(training_tasks(spec)) > 1 else None


def check_cluster_shape(spec: object, source: str) -> None:
    """Raise a TrainerError naming the first part of a TF_CONFIG or CLUSTER_SPEC that has the wrong JSON shape:
    an object {"cluster": {TYPE: ["host:port", ...]}, "task": {"type": TYPE, "index": N}}, N a whole number
    from 0 (whether the task is in its cluster is `wait_for_peers`'s check)."""
    def refuse(what: str) -> TrainerError:
        return TrainerError(f"{source}: {what}; expected {{\"cluster\": {{\"worker\": [\"host:port\", ...]}}, "
                            "\"task\": {\"type\": \"worker\", \"index\": 0}}")

    if not isinstance(spec, dict):
        raise refuse(f"is a JSON {type(spec).__name__}, not an object")
    cluster, task = spec.get("cluster", {}), spec.get("task", {})
    if not isinstance(cluster, dict):
        raise refuse(f"\"cluster\" is a JSON {type(cluster).__name__}, not an object")
    for kind, hosts in cluster.items():
        if not isinstance(hosts, list) or not all(isinstance(host, str) for host in hosts):
            raise refuse(f"\"cluster\".\"{kind}\" is not a list of \"host:port\" strings")
        for host in hosts:
            port = host.rpartition(":")[2]
            if not (port.isdigit() and 0 < int(port) < 65536):
                raise refuse(f"\"cluster\".\"{kind}\" address {host!r} has no port number in [1, 65535]")
    if not isinstance(task, dict):
        raise refuse(f"\"task\" is a JSON {type(task).__name__}, not an object")
    index = task.get("index", 0)
    if isinstance(index, str) and index.isdigit():  # Vertex AI's CLUSTER_SPEC has been seen with "0"
        index = int(index)
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise refuse(f"\"task\".\"index\" {json.dumps(task.get('index'))} is not a whole number from 0")
    kind = task.get("type")
    if kind is not None and not isinstance(kind, str):
        raise refuse(f"\"task\".\"type\" {json.dumps(kind)} is not a string")


def training_tasks(tf_config: dict) -> List[tuple]:
    """(kind, index, address) of every task that trains (chief, master, worker), the replicas of a
    MultiWorkerMirroredStrategy; ps and evaluator tasks do not."""
    cluster = tf_config.get("cluster", {})
    return [(kind, index, address) for kind in ("chief", "master", "worker")
            for index, address in enumerate(cluster.get(kind, []))]


def chief_of(tf_config: dict) -> tuple:
    """(task_type, task_id, is_chief): `chief` or `master` when the cluster has one, else worker 0."""
    cluster = tf_config.get("cluster", {})
    task = tf_config.get("task", {})
    task_type, task_id = task.get("type", "worker"), int(task.get("index", 0))
    if "chief" in cluster or "master" in cluster:
        is_chief = task_type in ("chief", "master")
    else:
        is_chief = task_type == "worker" and task_id == 0
    return task_type, task_id, is_chief


def attached_tpu(environ: Mapping[str, str], tpu: Optional[str] = None) -> Optional[str]:
    """The TPU to connect to, found without TensorFlow in well under a second: a name, 'local' or None."""
    if tpu:
        return tpu
    if environ.get("TPU_NAME"):
        return environ["TPU_NAME"]
    if os.path.exists("/dev/accel0") or glob.glob("/dev/vfio/[0-9]*"):  # TPU VMs (v2-v4: accel, v5+: vfio)
        return "local"
    if environ.get("COLAB_TPU_ADDR"):  # legacy Colab TPU node
        return "grpc://" + environ["COLAB_TPU_ADDR"]
    return None


# TensorFlow reaches the chips of a TPU VM through libtpu's PJRT plugin. TensorFlow reads these variables
# when it is imported (it loads TF_PLUGGABLE_DEVICE_LIBRARY_PATH then), so they must be set before that.
PJRT_ENVIRONMENT = {"PJRT_DEVICE": "TPU", "NEXT_PLUGGABLE_DEVICE_USE_C_API": "true"}
# Where TPU VM images without the libtpu package keep the library.
SYSTEM_LIBTPU = "/lib/libtpu.so"


def libtpu_library() -> Optional[str]:
    """Path of libtpu's shared library: the `libtpu` package's libtpu.so (located without importing the
    package), else the TPU VM image's /lib/libtpu.so; None when neither exists."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("libtpu")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(folder, "libtpu.so")
        if os.path.isfile(candidate):
            return candidate
    return SYSTEM_LIBTPU if os.path.isfile(SYSTEM_LIBTPU) else None


def tpu_environment(strategy: str, environ: Mapping[str, str], tpu: Optional[str] = None) -> dict:
    """The PJRT variables to add before TensorFlow loads, or {}: only when the run asks for this host's
    TPU (`--strategy tpu`, or `auto` with a TPU attached, resolved as 'local') and libtpu is installed.
    Variables the environment already sets are left as they are."""
    if strategy not in ("tpu", "auto"):
        return {}
    target = attached_tpu(environ, tpu) or ("local" if strategy == "tpu" else None)
    library = libtpu_library() if target == "local" else None
    if not library:
        return {}
    wanted = dict(PJRT_ENVIRONMENT, TF_PLUGGABLE_DEVICE_LIBRARY_PATH=library)
    return {name: value for name, value in wanted.items() if name not in environ}


def prepare_tpu_environment(strategy: str, tpu: Optional[str] = None, environ=None) -> dict:
    """Set `tpu_environment`'s variables in `environ` (default os.environ); returns what it set."""
    environ = os.environ if environ is None else environ
    added = tpu_environment(strategy, environ, tpu)
    environ.update(added)
    return added


def auto_choice(environ: Mapping[str, str], num_gpus: int) -> str:
    """What `auto` means once no TPU answered: multi_worker in a cluster, mirrored over 2+ GPUs, else default."""
    if cluster_config(environ):
        return "multi_worker"
    return "mirrored" if num_gpus >= 2 else "default"


def _connect_tpu(tpu: str, asked_by: str = "--strategy tpu"):
    import tensorflow as tf

    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    except Exception as error:  # ValueError, NotFoundError, IndexError... depending on the host
        raise TrainerError(f"{asked_by}: cannot reach TPU {tpu!r} ({type(error).__name__}: "
                           f"{str(error).splitlines()[0][:160] if str(error) else 'no detail'}); "
                           f"{tpu_hint(tpu, error)}") from None


def tpu_hint(tpu: str, error: BaseException) -> str:
    """What to do about a TPU that could not be reached, from what is known of this host."""
    if "ConfigureDistributedTPU" in str(error):  # TensorFlow started without TPU kernels
        import importlib.metadata

        try:
            importlib.metadata.version("tensorflow-tpu")
        except importlib.metadata.PackageNotFoundError:
            return ("this TensorFlow has no TPU support: install tensorflow-tpu (pip install 'mnist-trainer[tpu]') "
                    "in place of tensorflow or tensorflow-cpu")
        settings = ", ".join(f"{name}={os.environ.get(name, '(unset)')}" for name in
                             [*PJRT_ENVIRONMENT, "TF_PLUGGABLE_DEVICE_LIBRARY_PATH"])
        return f"TensorFlow started without libtpu's PJRT plugin ({settings})"
    if tpu == "local" and not libtpu_library():
        return "libtpu is not installed (pip install 'mnist-trainer[tpu]' brings it)"
    return "use --strategy auto or default on machines without a TPU"


# How long a worker waits for the rest of its cluster to start before it gives up (--cluster-wait). Vertex
# AI starts every replica of a job together, but a replica's image pull or machine can take minutes.
CLUSTER_WAIT_SECONDS = 600
# Once a signal came while the cluster was still starting: the time the peers get to join, so that the
# first vote of the training loop can stop every worker together, before this one leaves alone.
SIGNAL_GRACE_SECONDS = 20


def cluster_peers(tf_config: dict) -> List[tuple]:
    """(name, address) of every other training task (chief, master, worker), e.g. ('worker 1', 'host:2222')."""
    task = tf_config.get("task", {})
    own = (task.get("type"), int(task.get("index", 0)))
    return [(f"{kind} {index}", address) for kind, index, address in training_tasks(tf_config) if (kind, index) != own]


BEACON_GREETING = b"mnist-trainer waiting for its cluster\n"
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + empty SETTINGS


def _is_peer_reply(data: bytes) -> bool:
    """A waiting trainer's greeting, or the HTTP/2 SETTINGS frame a gRPC server (TensorFlow's) opens with."""
    return data.startswith(BEACON_GREETING[:8]) or (len(data) >= 9 and data[3] == 4)


def _peer_state(address: str, timeout: float = 1.0) -> str:
    """'started' when a trainer (waiting, or its TensorFlow server) answers at HOST:PORT, 'absent' when nothing
    accepts connections there, 'foreign' when something else does (it would block TensorFlow's start for ever)."""
    host, _, port = address.rpartition(":")
    try:
        connection = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except (OSError, ValueError):  # refused, unreachable, a name not resolvable yet, a bad port
        return "absent"
    with connection:
        try:
            connection.settimeout(0.5)
            try:
                data = connection.recv(64)
            except socket.timeout:
                connection.sendall(_HTTP2_PREFACE)
                connection.settimeout(timeout)
                data = connection.recv(64)
        except OSError:  # accepted, then silence or a reset: not a trainer
            return "foreign"
    return "started" if _is_peer_reply(data) else "foreign"


def not_started(peers: List[tuple]) -> List[str]:
    """The peers that do not answer as a trainer yet, as 'worker 1 (host:port)' (with a note when something
    that is not a trainer holds the port)."""
    missing = []
    for name, address in peers:
        state = _peer_state(address)
        if state == "absent":
            missing.append(f"{name} ({address})")
        elif state == "foreign":
            missing.append(f"{name} ({address}: something that is not a TensorFlow worker holds this port)")
    return missing


class _Beacon:
    """A listening socket on this task's own port while it waits for its peers, so that they see it start
    before TensorFlow's server takes the port over (SO_REUSEADDR: the port is free again at once). It greets
    every connection with BEACON_GREETING, which tells it apart from another program holding the port."""

    def __init__(self, address: str):
        port = int(address.rpartition(":")[2])
        try:
            if socket.has_dualstack_ipv6():
                self.server = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True,
                                                   reuse_port=False)
            else:
                self.server = socket.create_server(("", port))
        except OSError as error:
            raise TrainerError(f"cannot listen on port {port} ({address} in the cluster spec): {error.strerror}; "
                               "another process holds it") from None
        self.server.settimeout(0.2)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._greet, name="cluster-beacon", daemon=True)
        self.thread.start()

    def _greet(self) -> None:
        while not self.done.is_set():
            try:
                connection, _ = self.server.accept()
            except OSError:  # the 0.2 s timeout (check `done` again), or the socket closed
                continue
            try:
                connection.settimeout(1.0)
                connection.sendall(BEACON_GREETING)
                while connection.recv(64):  # the prober closes first, so this port keeps no TIME_WAIT
                    pass
            except OSError:
                pass
            finally:
                connection.close()

    def __enter__(self) -> "_Beacon":
        return self

    def __exit__(self, *_exc) -> None:
        self.done.set()
        self.thread.join(timeout=2)
        self.server.close()


def wait_for_peers(tf_config: dict, wait_seconds: float, log=print, signals=None) -> None:
    """Return once every other training task of the cluster listens on its port; at most `wait_seconds` (0:
    forever), else a TrainerError naming the missing tasks.

    Why not leave it to TensorFlow: MultiWorkerMirroredStrategy's creation blocks until every task has
    registered with the coordination service on task 0, with no deadline, holding the GIL (no signal
    handler runs, no watchdog thread either). So each task first opens its own port (a beacon) and probes
    its peers' ports from Python. A stop signal during the wait gives the peers SIGNAL_GRACE_SECONDS more
    to appear (the training loop's first vote then stops everyone together); then this task stops alone.
    """
    task, cluster = tf_config.get("task", {}), tf_config.get("cluster", {})
    try:
        own = cluster[task.get("type")][int(task.get("index", 0))]
    except (KeyError, IndexError, TypeError, ValueError):
        raise TrainerError(f"TF_CONFIG: this task ({task.get('type')} {task.get('index', 0)}) is not in its "
                           f"cluster ({', '.join(f'{kind} x{len(hosts)}' for kind, hosts in cluster.items())})"
                           ) from None
    peers = cluster_peers(tf_config)
    started = time.monotonic()
    deadline = started + wait_seconds if wait_seconds else float("inf")
    next_report, graced = started + min(10, wait_seconds / 2 or 10), False
    with _Beacon(own):
        while True:
            missing = not_started(peers)
            if not missing:
                return
            now = time.monotonic()
            signalled = signals is not None and signals.exit_code is not None
            if signalled and not graced:
                deadline, graced = min(deadline, now + SIGNAL_GRACE_SECONDS), True
            if now >= deadline:
                if signalled:
                    from trainer.stopping import NAMES
                    raise Interrupted(signals.exit_code, f"stopped by {NAMES[signals.exit_code]} while waiting for "
                                                         f"the cluster to start (not started: {', '.join(missing)}); "
                                                         "nothing was saved")
                raise TrainerError(f"the cluster did not start within {wait_seconds:g} s (--cluster-wait): not "
                                   f"started: {', '.join(missing)}; check those replicas' logs, or raise "
                                   "--cluster-wait when replicas start far apart")
            if now >= next_report:
                limit = f"giving up after {wait_seconds:g} s, --cluster-wait" if wait_seconds else "no limit"
                log(f"waiting for the cluster to start ({now - started:.0f} s): not started: {', '.join(missing)} "
                    f"({limit})")
                next_report = now + 30
            time.sleep(0.5)


_TASK = re.compile(r"/job:(\w+)/replica:\d+/task:(\d+)")


def lost_peer(error: BaseException, own_task: tuple) -> Optional[str]:
    """What a collective's failure says about a lost peer, as 'worker 1 stopped sending heartbeats', or None
    when the error is not about another task. TensorFlow reports a task whose heartbeats stopped (the
    coordination service's check, about 10 s) or a connection the peer's death reset; the text is all
    there is to go on."""
    if type(error).__name__ not in ("UnavailableError", "AbortedError", "CancelledError", "InternalError",
                                    "DeadlineExceededError"):
        return None
    text = str(getattr(error, "message", "") or error)
    unhealthy = re.search(r"tasks are unhealthy[^\n]*\n((?:\s*/job:\S+\s*\n?)+)", text)
    region = unhealthy.group(1) if unhealthy else text
    tasks = []
    for kind, index in _TASK.findall(region):
        if (kind, int(index)) != own_task and f"{kind} {index}" not in tasks:
            tasks.append(f"{kind} {index}")
    if not tasks:
        return None
    if unhealthy or "heartbeat" in text:
        how = "stopped sending heartbeats"
    elif re.search(r"Connection reset|Socket closed|Connection refused|failed to connect|Broken pipe", text, re.I):
        how = "closed its connection"
    else:
        how = "stopped answering"
    return f"{' and '.join(tasks)} {how}"


def resolve_strategy(name: str, environ: Optional[Mapping[str, str]] = None, tpu: Optional[str] = None,
                     cluster_wait: float = CLUSTER_WAIT_SECONDS, log=print) -> Resolved:
    import tensorflow as tf

    environ = os.environ if environ is None else environ
    if name == "auto":
        found = attached_tpu(environ, tpu)
        named = "--tpu" if tpu else "TPU_NAME" if environ.get("TPU_NAME") else None
        if found:
            try:
                return Resolved(_connect_tpu(found, f"{named} {found}" if named else "--strategy auto"), "tpu")
            except TrainerError:
                if named:  # a TPU the user named: training without it would be a silent wrong result
                    raise
                # a device file without a usable TPU: fall through to the other strategies
        # physical, not logical: listing logical devices starts the runtime, and MultiWorkerMirrored
        # must configure collectives before that
        name = auto_choice(environ, len(tf.config.list_physical_devices("GPU")))
    if name == "default":
        return Resolved(tf.distribute.get_strategy(), "default")
    if name == "one_device":
        device = "/gpu:0" if tf.config.list_logical_devices("GPU") else "/cpu:0"
        return Resolved(tf.distribute.OneDeviceStrategy(device), "one_device")
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return Resolved(tf.distribute.MirroredStrategy(devices), "mirrored")
    if name == "multi_worker":
        tf_config = cluster_config(environ)
        if tf_config is None:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()  # a cluster of one: useful for trying it out
            return Resolved(strategy, "multi_worker")
        task_type, task_id, is_chief = chief_of(tf_config)
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(tf_config["cluster"]), task_type=task_type, task_id=task_id, rpc_layer="grpc")
        from trainer.stopping import RunSignals

        wait_for_peers(tf_config, cluster_wait, log, RunSignals.current)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
        if RunSignals.current is not None:
            RunSignals.current.reclaim()  # the strategy took SIGTERM over
        return Resolved(strategy, "multi_worker", is_chief, task_type, task_id, len(training_tasks(tf_config)))
    if name == "tpu":
        return Resolved(_connect_tpu(attached_tpu(environ, tpu) or "local"), "tpu")
    raise ValueError(f"unknown strategy {name!r}")


def set_up(config: Config, environ: Mapping[str, str], log=print) -> Resolved:
    """The host's devices and thread pools as the config asks, then the strategy it names."""
    configure_host(config.cpu_devices, config.intra_op_threads, config.inter_op_threads)
    return resolve_strategy(config.strategy, environ, config.tpu, config.cluster_wait, log)


def precision_and_compilation(config: Config, resolved: Resolved) -> Tuple[str, Optional[bool]]:
    """The Keras dtype policy and the step functions' `jit_compile` for this config on this strategy."""
    return (mixed_precision_policy(config.mixed_precision, resolved),
            jit_compile_setting(config.jit_compile, resolved))


def mixed_precision_policy(setting: str, resolved: Resolved) -> str:
    """The Keras dtype policy: bf16 on TPU, fp16 on GPU, float32 on CPU unless asked otherwise."""
    if setting == "bf16":
        return "mixed_bfloat16"
    if setting == "fp16":
        return "mixed_float16"
    if setting == "off":
        return "float32"
    if resolved.name == "tpu":
        return "mixed_bfloat16"
    import tensorflow as tf

    return "mixed_float16" if tf.config.list_logical_devices("GPU") else "float32"


def jit_compile_setting(setting: str, resolved: Resolved) -> Optional[bool]:
    """`jit_compile` for the train and predict functions: None on a TPU (every TPU step is XLA already),
    else on for `on`, and for `auto` on a GPU only: on a 2-core CPU the XLA-compiled step was slower
    (docs/tpu.md). Several CPU replicas (MirroredStrategy over logical CPU devices, or
    CPU workers) cannot run the compiled step in TensorFlow 2.21, so `on` there is refused."""
    import tensorflow as tf

    from trainer.errors import TrainerError

    if resolved.name == "tpu":
        return None
    on_gpu = bool(tf.config.list_logical_devices("GPU"))
    if setting == "on" and not on_gpu and resolved.num_replicas > 1:
        raise TrainerError(f"--jit-compile on cannot run with --strategy {resolved.name} over CPU devices (XLA in "
                           "TensorFlow 2.21 cannot reach one CPU device's variables from another, nor sync them "
                           "inside a compiled step); use --jit-compile off")
    return setting == "on" or (setting == "auto" and on_gpu)
