"""Resolve a tf.distribute strategy by name, once, and say whether this process is the chief.

Names: auto | default | one_device | mirrored | multi_worker | tpu. Unknown names raise ValueError;
a strategy the machine cannot provide raises TrainerError with one clear line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

from trainer.errors import TrainerError


@dataclasses.dataclass
class Resolved:
    strategy: Any
    name: str  # as resolved: "default" when "auto" was asked on a plain CPU machine
    is_chief: bool = True
    task_type: Optional[str] = None
    task_id: int = 0

    @property
    def num_replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)


def cluster_spec(environ: Mapping[str, str]) -> Optional[dict]:
    """TF_CONFIG as a dict, or None when unset or naming a single task."""
    raw = environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        tf_config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise TrainerError(f"TF_CONFIG is not valid JSON ({error})") from None
    tasks = sum(len(v) for v in tf_config.get("cluster", {}).values())
    return tf_config if tasks > 1 else None


def chief_of(tf_config: dict) -> tuple:
    """(task_type, task_id, is_chief): chief or master when present, else worker 0."""
    cluster = tf_config.get("cluster", {})
    task = tf_config.get("task", {})
    task_type, task_id = task.get("type", "worker"), int(task.get("index", 0))
    if "chief" in cluster or "master" in cluster:
        is_chief = task_type in ("chief", "master")
    else:
        is_chief = task_type == "worker" and task_id == 0
    return task_type, task_id, is_chief


def resolve_strategy(name: str, environ: Optional[Mapping[str, str]] = None) -> Resolved:
    import tensorflow as tf

    environ = os.environ if environ is None else environ
    if name == "auto":
        if cluster_spec(environ):
            name = "multi_worker"
        elif len(tf.config.list_logical_devices("GPU")) >= 2:
            name = "mirrored"
        else:
            name = "default"
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
        tf_config = cluster_spec(environ)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        task_type, task_id, is_chief = chief_of(tf_config) if tf_config else (None, 0, True)
        return Resolved(strategy, "multi_worker", is_chief, task_type, task_id)
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=environ.get("TPU_NAME", "local"))
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except Exception as error:  # no TPU: ValueError, NotFoundError, IndexError depending on the host
            raise TrainerError(f"--strategy tpu: no TPU found ({type(error).__name__}); use --strategy auto "
                               "or default on machines without one") from None
        return Resolved(tf.distribute.TPUStrategy(resolver), "tpu")
    raise ValueError(f"unknown strategy {name!r}")
