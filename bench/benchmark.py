"""The seed notebook against this trainer, side by side on one machine and one dataset.

    python bench/benchmark.py [--rounds 3] [--checks-per-epoch 10] [--out bench/results]

Data: full Fashion-MNIST from Debian's dataset-fashion-mnist. Every measurement is a separate process,
and baseline and trainer alternate within each round; the medians over rounds are reported. Prints a
markdown table and writes results.json and results.md to --out.

  1. training examples/s (evaluation excluded), same architecture: the seed notebook (`fit` on numpy),
     the trainer with --preset seed, and the ceiling (the seed model's train step in a tight tf.function
     loop on in-memory tensors);
  2. whole-process wall time of the same 2-epoch job, start to saved model;
  3. training time until the test accuracy first reaches 90% (both sides checked --checks-per-epoch
     times an epoch, 10 by default, the checks' time excluded): the seed notebook vs the default recipe;
  4. test accuracy of the default recipe after its default epochs;
  5. peak resident memory of each process (the 2-epoch jobs), and the time of `trainer.task --help`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "idx:/usr/share/datasets/fashion-mnist"


def measured(command, env=None):
    """Run a command; returns (wall seconds, peak RSS in MiB) of that process alone (wait4's rusage)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{process.stderr.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def load(path):
    with open(path) as handle:
        return json.load(handle)


def one_round(scratch, index, env, recipe=True, checks=10):
    python = sys.executable
    result = {}
    out = os.path.join(scratch, f"baseline2-{index}.json")
    result["baseline_wall"], result["baseline_rss"] = measured(
        [python, "bench/seed_baseline.py", "--epochs", "2", "--out", out], env)
    result["baseline_eps"] = load(out)["examples_per_second"]

    job = os.path.join(scratch, f"trainer2-{index}")
    result["trainer_wall"], result["trainer_rss"] = measured(
        [python, "-m", "trainer.task", "--dataset", FASHION, "--preset", "seed", "--epochs", "2", "--job-dir", job], env)
    result["trainer_eps"] = load(os.path.join(job, "metrics.json"))["train_examples_per_second"]

    out = os.path.join(scratch, f"ceiling-{index}.json")
    measured([python, "bench/probes.py", "ceiling", "--out", out], env)
    result["ceiling_eps"] = load(out)["examples_per_second"]

    helps = [measured([python, "-m", "trainer.task", "--help"], env)[0] for _ in range(5)]
    result["help_seconds"] = statistics.median(helps)
    if not recipe:
        return result

    out = os.path.join(scratch, f"baseline90-{index}.json")
    measured([python, "bench/seed_baseline.py", "--until-accuracy", "0.9", "--checks-per-epoch", str(checks),
              "--out", out], env)
    baseline90 = load(out)
    result["baseline_to90"], result["baseline_to90_epochs"] = baseline90["seconds_to_target"], baseline90["epochs_to_target"]

    out = os.path.join(scratch, f"default-{index}.json")
    job = os.path.join(scratch, f"default-{index}")
    measured([python, "bench/probes.py", "to-accuracy", "--target", "0.9", "--checks-per-epoch", str(checks),
              "--out", out, "--",
              "--dataset", FASHION, "--job-dir", job], env)
    default = load(out)
    result["default_to90"], result["default_to90_epochs"] = default["seconds_to_target"], default["epochs_to_target"]
    result["default_accuracy"], result["default_train_seconds"] = default["test_accuracy"], default["train_seconds"]
    result["default_epochs"] = default["epochs"]
    return result


def table(medians, rounds, checks):
    m = medians
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "n/a"  # noqa: E731
    recipe_rows = [] if "default_accuracy" not in m else [
        (f"Training time to 90% test accuracy (s; test accuracy checked {checks} times an epoch)",
         f"{m['baseline_to90']:.1f} ({m['baseline_to90_epochs']:.2f} epochs)",
         f"{m['default_to90']:.1f} with the default recipe ({m['default_to90_epochs']:.2f} epochs; "
         f"{ratio(m['baseline_to90'], m['default_to90'])} sooner)" if m["default_to90"] else "not reached"),
        ("Default recipe: test accuracy after its default epochs", "",
         f"{m['default_accuracy']:.4f} ({m['default_epochs']:.0f} epochs, {m['default_train_seconds']:.0f} s training)"),
    ]
    rows = [
        ("Training throughput, seed architecture (examples/s)", f"{m['baseline_eps']:,.0f}",
         f"{m['trainer_eps']:,.0f} ({ratio(m['trainer_eps'], m['baseline_eps'])}; "
         f"{m['trainer_eps'] / m['ceiling_eps']:.0%} of the {m['ceiling_eps']:,.0f} ceiling)"),
        ("Whole process, 2-epoch job to saved model (s)", f"{m['baseline_wall']:.1f}", f"{m['trainer_wall']:.1f}"),
        *recipe_rows,
        ("Peak resident memory, 2-epoch job (MiB)", f"{m['baseline_rss']:,.0f}", f"{m['trainer_rss']:,.0f}"),
        ("`python -m trainer.task --help` (s)", "", f"{m['help_seconds']:.2f}"),
    ]
    lines = [f"| measure (median of {len(rounds)} rounds) | seed notebook | this trainer |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    per_round = lambda a, b: ", ".join(ratio(r[a], r[b]) for r in rounds)  # noqa: E731
    lines += ["", f"Per round, trainer over baseline: throughput {per_round('trainer_eps', 'baseline_eps')}; "
                  f"trainer over ceiling {', '.join(format(r['trainer_eps'] / r['ceiling_eps'], '.0%') for r in rounds)}"
                  + ("" if "default_to90" not in rounds[0] else
                     f"; time to 90% (baseline over default) {per_round('baseline_to90', 'default_to90')}") + "."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--checks-per-epoch", type=int, default=10,
                        help="how often both sides check the test accuracy for measure 3 (the checks' time is "
                             "excluded); the first check at or above 90%% ends the clock")
    parser.add_argument("--skip-recipe", action="store_true",
                        help="leave out measures 3 and 4 (time to 90%% and the default recipe's full run: "
                             "most of the benchmark's time)")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    rounds = []
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(args.rounds):
            started = time.perf_counter()
            rounds.append(one_round(scratch, index, env, recipe=not args.skip_recipe, checks=args.checks_per_epoch))
            print(f"round {index + 1}/{args.rounds} done in {time.perf_counter() - started:.0f} s: "
                  f"{json.dumps(rounds[-1])}", flush=True)
    medians = {key: statistics.median(r[key] for r in rounds if r[key] is not None)
               if any(r[key] is not None for r in rounds) else None for key in rounds[0]}
    machine = f"{os.cpu_count()} cores, Python {sys.version.split()[0]}"
    text = table(medians, rounds, args.checks_per_epoch)
    print(f"\n{machine}\n{text}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(dict(machine=machine, rounds=rounds, medians=medians), handle, indent=2)
    with open(os.path.join(args.out, "results.md"), "w") as handle:
        command = (f"python bench/benchmark.py --rounds {args.rounds}"
                   f"{' --skip-recipe' if args.skip_recipe else f' --checks-per-epoch {args.checks_per_epoch}'}")
        handle.write(f"Machine: {machine}. Command: `{command}`.\n\n{text}\n")


if __name__ == "__main__":
    main()
