"""Install the sdist of a `--package` job the way its executor image would, for `--package --local`.

Vertex AI copies the request's `package_uris` onto the executor image, pip-installs them and runs
`python -m PYTHON_MODULE ARGS`. Locally the sdist is the very archive submission would upload (it is not
uploaded), and the executor image is a throw-away virtual environment: made with
`--system-site-packages`, and, when this runner itself runs in a virtual environment, with a `.pth` line
adding that environment's site-packages, so that TensorFlow and the other dependencies already here stand in
for the image's preinstalled ones and are not downloaded again. pip then installs the archive itself
with this environment's pip (`pip --python VENV/bin/python`, pip 22.3 or later; the venv gets no pip of its
own), build isolation off (the setuptools here builds it), checking every dependency the package declares
against what the venv sees. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
from typing import Callable

from trainer.errors import TrainerError


def _run(argv, what: str) -> str:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=os.path.dirname(argv[0]))
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or [f"exit code {result.returncode}"]
        raise TrainerError(f"{what} failed: {lines[-1]}")
    return result.stdout.strip()


def install(archive: str, folder: str, say: Callable[[str], None]) -> str:
    """A new virtual environment in `folder` with `archive` pip-installed; returns its Python."""
    venv = os.path.join(folder, "venv")
    _run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", venv],
         f"creating the virtual environment {venv}")
    python = os.path.join(venv, "bin", "python")
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], "asking the venv")
    if sys.prefix != sys.base_prefix:  # the runner's own virtual environment stands in for the image's packages
        with open(os.path.join(purelib, "runner-environment.pth"), "w") as handle:
            handle.write("\n".join(site.getsitepackages()) + "\n")
    say(f"installing {os.path.basename(archive)} into a throw-away virtual environment {venv} (--system-site-packages "
        "plus this environment's packages, so TensorFlow is not downloaded again)")
    # this environment's pip, installing for the venv's Python (pip --python): no copy of pip made in it
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--disable-pip-version-check",
          "--no-build-isolation", archive], f"pip install {os.path.basename(archive)}")
    where = _run([python, "-c", "import trainer, os; print(os.path.dirname(trainer.__file__))"],
                 "importing the installed package")
    say(f"the replicas import the installed package: {where}")
    return python
