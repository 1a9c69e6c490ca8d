"""The TPU VM set-up TensorFlow needs, tested without a TPU: the PJRT plugin environment and the `local`
TPU resolution.

No TPU and no libtpu exist on this machine. A stand-in `libtpu` package (an empty libtpu.so beside an
empty __init__.py) takes libtpu's place where only its location matters; TensorFlow itself then tries to
load that file, which proves the variables were set before it was imported. The TPU system's start and
TPUStrategy are stand-ins in one test (they need a TPU); the cluster resolver there is TensorFlow's own.
"""

import os
import sys

import pytest

from helpers import run_cli
from trainer import distribute
from trainer.distribute import tpu_environment


@pytest.fixture
def fake_libtpu(tmp_path, monkeypatch):
    """A stand-in `libtpu` package on sys.path: (its folder for PYTHONPATH, its libtpu.so)."""
    package = tmp_path / "site" / "libtpu"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "libtpu.so").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(distribute, "SYSTEM_LIBTPU", str(tmp_path / "no-system-libtpu.so"))
    return str(tmp_path / "site"), str(package / "libtpu.so")


def test_pjrt_variables_are_set_only_when_this_hosts_tpu_is_asked_for(fake_libtpu):
    _, library = fake_libtpu
    assert distribute.attached_tpu({}) is None, "this machine has no TPU device files"
    expected = {"PJRT_DEVICE": "TPU", "NEXT_PLUGGABLE_DEVICE_USE_C_API": "true",
                "TF_PLUGGABLE_DEVICE_LIBRARY_PATH": library}
    assert tpu_environment("tpu", {}) == expected
    assert tpu_environment("tpu", {}, tpu="local") == expected
    assert tpu_environment("auto", {"TPU_NAME": "local"}) == expected
    assert tpu_environment("auto", {}) == {}, "auto without a TPU attached"
    for strategy in ("default", "one_device", "mirrored", "multi_worker"):
        assert tpu_environment(strategy, {"TPU_NAME": "local"}) == {}
    assert tpu_environment("tpu", {}, tpu="my-tpu-node") == {}, "a TPU node is reached over gRPC, no plugin"


def test_a_users_own_pjrt_settings_are_kept(fake_libtpu):
    mine = {"TF_PLUGGABLE_DEVICE_LIBRARY_PATH": "/opt/mine/libtpu.so", "PJRT_DEVICE": "TPU"}
    assert tpu_environment("tpu", mine) == {"NEXT_PLUGGABLE_DEVICE_USE_C_API": "true"}
    environ = dict(mine, NEXT_PLUGGABLE_DEVICE_USE_C_API="false")
    assert distribute.prepare_tpu_environment("tpu", environ=environ) == {}
    assert environ == dict(mine, NEXT_PLUGGABLE_DEVICE_USE_C_API="false")


def test_libtpu_is_found_in_its_package_else_in_the_tpu_vm_image(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not os.path.isdir(os.path.join(p, "libtpu"))])
    monkeypatch.setattr(distribute, "SYSTEM_LIBTPU", str(tmp_path / "libtpu.so"))
    assert distribute.libtpu_library() is None
    assert tpu_environment("tpu", {}) == {}, "without libtpu nothing is set: TensorFlow could not use it"
    (tmp_path / "libtpu.so").write_bytes(b"")
    assert distribute.libtpu_library() == str(tmp_path / "libtpu.so")


def test_the_trainer_sets_them_before_tensorflow_loads(fake_libtpu, tmp_path):
    """TensorFlow loads TF_PLUGGABLE_DEVICE_LIBRARY_PATH when it is imported: with the stand-in's empty
    libtpu.so, a run asking for the TPU fails there, naming the file, in one line. A run on the default
    strategy never points TensorFlow at it."""
    site, library = fake_libtpu
    pythonpath = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))), site])
    asked = run_cli(["--strategy", "tpu", "--dataset", "idx:/nowhere", "--job-dir", str(tmp_path / "a")],
                    PYTHONPATH=pythonpath)
    assert asked.returncode == 1 and "Traceback" not in asked.stderr
    last_line = asked.stderr.strip().splitlines()[-1]
    assert last_line == f"error: TensorFlow failed: NotFoundError: {library}: file too short"
    plain = run_cli(["--strategy", "default", "--dataset", "idx:/nowhere", "--job-dir", str(tmp_path / "b")],
                    PYTHONPATH=pythonpath)
    assert plain.returncode == 1 and library not in plain.stderr and "/nowhere" in plain.stderr


def test_strategy_tpu_resolves_the_local_tpu_with_tensorflows_resolver(monkeypatch):
    """TensorFlow's own TPUClusterResolver(tpu="local") and connect_to_cluster run; the TPU system's start
    and TPUStrategy are stand-ins (both need a TPU), recording what they were given."""
    import tensorflow as tf

    calls = []

    class OneChipStrategy:
        num_replicas_in_sync = 1

        def __init__(self, resolver):
            calls.append(("strategy", resolver))

    monkeypatch.setattr(tf.tpu.experimental, "initialize_tpu_system", lambda resolver: calls.append(("init", resolver)))
    monkeypatch.setattr(tf.distribute, "TPUStrategy", OneChipStrategy)
    for strategy, environ in (("tpu", {}), ("auto", {"TPU_NAME": "local"})):
        calls.clear()
        resolved = distribute.resolve_strategy(strategy, environ)
        (_, resolver), (_, same) = calls
        assert [call for call, _ in calls] == ["init", "strategy"] and resolver is same
        assert isinstance(resolver, tf.distribute.cluster_resolver.TPUClusterResolver)
        assert resolver.master() == "" and resolver.cluster_spec().as_dict() == {}, "this host's TPU, no gRPC"
        assert resolved.name == "tpu" and resolved.num_replicas == 1


def test_a_tensorflow_without_tpu_kernels_is_named():
    """The error text is TensorFlow's when the TPU system starts without TPU kernels (users' reports);
    tensorflow-cpu, installed here, is the TensorFlow without them."""
    error = RuntimeError("No OpKernel was registered to support Op 'ConfigureDistributedTPU' used by node "
                         "ConfigureDistributedTPU")
    assert distribute.tpu_hint("local", error).startswith("this TensorFlow has no TPU support: install tensorflow-tpu")
