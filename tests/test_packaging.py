"""The built wheel installs on Python 3.13, Colab's Python, checked without a 3.13 interpreter: pip resolves
the wheel and its dependencies for 3.13 (`--python-version 3.13 --only-binary=:all: --dry-run`), so every
dependency must publish a wheel 3.13 can use. promise, which tensorflow-datasets needs, ships only as a
pure-Python sdist (pip builds it on a user's machine), so it is built into a wheel first.

Needs the package index (PyPI): pip reads the packages' metadata, nothing is installed.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT_DIR

COLAB_PINS = os.path.join(ROOT_DIR, "deploy", "colab", "constraints.txt")
COLAB_LIBTPU = "0.0.21.1"  # what Colab's TPU runtimes install for JAX 0.7.2
NOTEBOOK = os.path.join(ROOT_DIR, "deploy", "colab_tpu.ipynb")


def pip(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """This project's wheel, built from a copy of the sources, and a wheel of promise, in one folder."""
    folder = tmp_path_factory.mktemp("wheels")
    source = tmp_path_factory.mktemp("source")
    for name in ("setup.py", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT_DIR, name), source / name)
    for package in ("trainer", "tuning", "deploy"):
        shutil.copytree(os.path.join(ROOT_DIR, package), source / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.ipynb"))
    for target in (str(source), "promise"):
        built = pip("wheel", "--no-deps", "-q", "-w", str(folder), target)
        assert built.returncode == 0, built.stderr[-2000:]
    return folder


def resolve_for_python_313(wheels, requirements, *options):
    """{name: version} of what pip would install on Python 3.13 (Linux x86-64, wheels only)."""
    report = wheels / "report.json"
    result = pip("install", "--dry-run", "--ignore-installed", "--quiet", "--python-version", "3.13",
                 "--only-binary=:all:", "--find-links", str(wheels), "--report", str(report), *options,
                 *requirements)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(report) as handle:
        installed = json.load(handle)["install"]
    return {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"] for item in installed}


def project_wheel(wheels):
    return next(str(path) for path in wheels.iterdir() if path.name.startswith("mnist_trainer-"))


@pytest.mark.slow
def test_the_wheel_with_cpu_resolves_for_python_3_13(wheels):
    versions = resolve_for_python_313(wheels, [project_wheel(wheels) + "[cpu]"])
    assert "mnist-trainer" in versions and "promise" in versions
    assert versions["tensorflow-cpu"].startswith(("2.20.", "2.21."))


@pytest.mark.slow
def test_colabs_cpu_stack_satisfies_the_wheel_on_python_3_13(wheels):
    versions = resolve_for_python_313(wheels, [project_wheel(wheels) + "[cpu]"], "--constraint", COLAB_PINS)
    pins = dict(line.split("==") for line in open(COLAB_PINS).read().splitlines() if line and line[0] != "#")
    assert {name: versions[name] for name in pins} == pins


@pytest.mark.slow
def test_the_notebooks_tpu_install_keeps_colabs_libtpu_on_python_3_13(wheels):
    """What the notebook installs on a Colab TPU runtime: tensorflow-tpu 2.20.0 beside the libtpu already
    there for JAX, which must not move."""
    with open(NOTEBOOK) as handle:
        code = "".join("".join(cell["source"]) for cell in json.load(handle)["cells"])
    tensorflow_tpu = re.search(r'TENSORFLOW_TPU = "(tensorflow-tpu==[0-9.]+)"', code).group(1)
    versions = resolve_for_python_313(wheels, [tensorflow_tpu, f"libtpu=={COLAB_LIBTPU}", project_wheel(wheels)])
    assert versions["tensorflow-tpu"] == tensorflow_tpu.split("==")[1] and versions["libtpu"] == COLAB_LIBTPU
