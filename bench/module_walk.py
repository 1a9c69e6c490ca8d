"""How far a reader jumps between modules while following one run's calls.

Runs one tiny training (seed preset, a few hundred MNIST-format examples, one epoch, in-process) under
a profiler that watches the trainer's own functions. Reading the run as a person follows the code, each
function is read once, at its first call, and the reader returns to its caller when it ends. Printed:

The walk starts at `train.train_and_evaluate` (command-line parsing is left out).

- modules: how many trainer modules the walk visits;
- stays: how many times the reader arrives in a module (consecutive functions of one module are one stay);
- climbs: stays entered from a module that the new one imports, directly or not: the reader went back
  up to a higher-level module, either returning to a caller or called up into it (a callback or an
  import inside a function of a lower module);
- per module: how many separate stays it took.

    python bench/module_walk.py [--data idx:FOLDER]   (default: a few hundred synthetic IDX examples)

The import graph counts imports inside functions too, so a module's level does not depend on whether it
imports lazily.
"""

from __future__ import annotations

import argparse
import ast
import collections
import glob
import itertools
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "trainer")


def import_graph() -> dict:
    """{module: set of trainer modules it imports anywhere in its source}."""
    graph = {}
    for path in sorted(glob.glob(os.path.join(PACKAGE, "*.py"))):
        module = os.path.basename(path)[:-3]
        tree = ast.parse(open(path).read())
        graph[module] = {alias.name if node.module == "trainer" else node.module.split(".")[1]
                         for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
                         and node.module.startswith("trainer") for alias in node.names}
    return graph


def above(graph: dict) -> dict:
    """{module: the modules that import it, directly or not}."""
    importers = collections.defaultdict(set)
    for module in graph:
        todo, seen = [module], set()
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        for lower in seen:
            importers[lower].add(module)
    return importers


def trace_run(data: str, job_dir: str) -> list:
    """The modules the reader is in, in order, following first calls and their returns."""
    from trainer import task

    seen_code, stack, walk = set(), [], []
    started = []  # the walk starts where the run starts: train.train_and_evaluate

    def module_of(frame):
        filename = frame.f_code.co_filename
        if os.path.dirname(os.path.abspath(filename)) != PACKAGE:
            return None
        return os.path.basename(filename)[:-3]

    def profile(frame, event, arg):
        if event not in ("call", "return"):
            return
        module = module_of(frame)
        if module is None:
            return
        if not started:
            if event != "call" or (module, frame.f_code.co_name) != ("train", "train_and_evaluate"):
                return
            started.append(True)
        if event == "call":
            first = frame.f_code not in seen_code
            seen_code.add(frame.f_code)
            stack.append((frame, first))
            if first:
                walk.append((module, "call"))
        elif stack and stack[-1][0] is frame:
            _, first = stack.pop()
            if first and stack:
                walk.append((module_of(stack[-1][0]), "return"))

    sys.setprofile(profile)
    try:
        code = task.main(["--dataset", data, "--preset", "seed", "--epochs", "1", "--job-dir", job_dir,
                          "--train-limit", "600"])
    finally:
        sys.setprofile(None)
    if code != 0:
        raise SystemExit(f"the traced run failed with exit code {code}")
    return walk


def synthetic_idx(folder: str) -> str:
    import numpy as np

    from trainer.data import write_idx

    rng = np.random.default_rng(0)
    for split, count in (("train", 600), ("test", 200)):
        labels = rng.integers(0, 10, count).astype(np.uint8)
        images = (rng.random((count, 28, 28)) * 40).astype(np.uint8)
        for index, label in enumerate(labels):  # a bright bar whose place says the class
            images[index, 4 + 2 * label: 6 + 2 * label, 4:24] = 255
        write_idx(folder, split, images, labels)
    return f"idx:{folder}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="idx:FOLDER to train on (default: synthetic)")
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory() as scratch:
        data = args.data or synthetic_idx(os.path.join(scratch, "data"))
        walk = trace_run(data, os.path.join(scratch, "job"))
    stays = [step for index, step in enumerate(walk) if index == 0 or walk[index - 1][0] != step[0]]
    importers = above(import_graph())
    climbs = [(prev, cur) for prev, cur in itertools.pairwise(stays) if cur[0] in importers[prev[0]]]
    upward_calls = sum(1 for _, (_, how) in climbs if how == "call")
    print(f"modules {len(set(module for module, _ in stays))}  stays {len(stays)}  climbs {len(climbs)} "
          f"(returns to a caller {len(climbs) - upward_calls}, calls up into a higher module {upward_calls})")
    for module, count in collections.Counter(module for module, _ in stays).most_common():
        print(f"  {module:14} {count}")


if __name__ == "__main__":
    main()
