"""The seed notebook against this trainer, side by side on one machine and one dataset.

    python bench/benchmark.py [--rounds 3] [--pairs 3] [--checks-per-epoch 10] [--out bench/results]

Data: full Fashion-MNIST from Debian's dataset-fashion-mnist. Every measurement is a separate process,
and baseline and trainer alternate within each round; the medians over rounds are reported, with the
per-round figures. Each round runs the 2-epoch jobs of measures 1, 2 and 5 as --pairs pairs, in
alternating order, and keeps their medians; the table adds the median of every pair's throughput ratio
(the host's pace drifts by 10-30% over minutes; a pair runs within about a minute). The seed notebook's
side is seeded (keras.utils.set_random_seed(42), the trainer's default seed), so its learning curve is
the same in every round. Prints a markdown table and writes results.json, results.md and
accuracy_vs_time.png to --out.

  1. training examples/s (evaluation excluded), same architecture: the seed notebook (`fit` on numpy),
     the trainer with --preset seed, and the ceiling (the seed model's train step in a tight tf.function
     loop on in-memory tensors); over the 2-epoch job (the first epoch's tracing included) and in its
     second epoch alone (the steady state), each side from its own per-epoch timings;
  2. whole-process wall time of the same 2-epoch job, start to saved model;
  3. training time until the test accuracy first reaches 90% (both sides checked --checks-per-epoch
     times an epoch, 10 by default, the checks' time excluded): the seed notebook vs the default recipe;
     both then train on (the seed notebook to its 10 epochs, the default recipe to its own default
     epochs), checked once an epoch: the accuracy-against-training-time curves of accuracy_vs_time.png;
  4. test accuracy of the default recipe after its default epochs;
  5. peak resident memory of each process (the 2-epoch jobs), and the time of `trainer.task --help`.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "idx:/usr/share/datasets/fashion-mnist"


SEED = 42  # the trainer's default --seed, given to the seed notebook's side too
SEED_EPOCHS = 10  # the seed notebook's own epochs: the length of its curve (the default recipe runs its own)


def measured(command, env=None, output=None):
    """Run a command; returns (wall seconds, peak RSS in MiB) of that process alone (wait4's rusage).
    Its stdout goes to the file `output` when given (read after the process ends), else nowhere."""
    started = time.perf_counter()
    with open(output or os.devnull, "w") as stdout, tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) != 0:
            stderr.seek(0)
            raise SystemExit(f"failed: {' '.join(command)}\n{stderr.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def epoch_rates(path):
    """Training examples/s of each epoch, from the trainer's own epoch lines ("epoch 2/2 ... 3,942 examples/s")."""
    with open(path) as handle:
        return [float(rate.replace(",", "")) for rate in
                re.findall(r"^epoch \d+/\d+ .* ([\d,]+) examples/s", handle.read(), re.MULTILINE)]


def load(path):
    with open(path) as handle:
        return json.load(handle)


def two_epoch_jobs(scratch, index, env, trainer_first=False):
    """The 2-epoch job of each side, back to back (the trainer's first when `trainer_first`): throughput (over
    both epochs and in the second), wall time and peak memory."""
    python = sys.executable
    result = {}

    def baseline():
        out = os.path.join(scratch, f"baseline2-{index}.json")
        result["baseline_wall"], result["baseline_rss"] = measured(
            [python, "bench/seed_baseline.py", "--epochs", "2", "--seed", str(SEED), "--out", out], env)
        result["baseline_eps"] = load(out)["examples_per_second"]
        result["baseline_steady_eps"] = load(out)["epoch_examples_per_second"][-1]

    def trainer():
        job = os.path.join(scratch, f"trainer2-{index}")
        lines = os.path.join(scratch, f"trainer2-{index}.out")
        result["trainer_wall"], result["trainer_rss"] = measured(
            [python, "-m", "trainer.task", "--dataset", FASHION, "--preset", "seed", "--epochs", "2",
             "--job-dir", job], env, output=lines)
        result["trainer_eps"] = load(os.path.join(job, "metrics.json"))["train_examples_per_second"]
        result["trainer_steady_eps"] = epoch_rates(lines)[-1]

    for side in (trainer, baseline) if trainer_first else (baseline, trainer):
        side()
    return result


def one_round(scratch, index, env, recipe=True, checks=10, pairs=3):
    """One round's figures, and the two sides' accuracy-against-time curves (empty without the recipe).
    The 2-epoch jobs run as `pairs` pairs; the round keeps each figure's median over its pairs, and the
    trainer-over-notebook ratio of every pair (`pair_ratios`, `pair_steady_ratios`)."""
    python = sys.executable
    curves = {}
    # the order alternates, so that a host speeding up or slowing down favours neither side
    jobs = [two_epoch_jobs(scratch, f"{index}-{pair}", env, trainer_first=(index + pair) % 2 == 1)
            for pair in range(pairs)]
    result = {key: statistics.median(job[key] for job in jobs) for key in jobs[0]}
    result["pair_ratios"] = [job["trainer_eps"] / job["baseline_eps"] for job in jobs]
    result["pair_steady_ratios"] = [job["trainer_steady_eps"] / job["baseline_steady_eps"] for job in jobs]

    out = os.path.join(scratch, f"ceiling-{index}.json")
    measured([python, "bench/probes.py", "ceiling", "--out", out], env)
    result["ceiling_eps"] = load(out)["examples_per_second"]

    helps = [measured([python, "-m", "trainer.task", "--help"], env)[0] for _ in range(5)]
    result["help_seconds"] = statistics.median(helps)
    if not recipe:
        return result, curves

    out = os.path.join(scratch, f"baseline90-{index}.json")
    measured([python, "bench/seed_baseline.py", "--until-accuracy", "0.9", "--checks-per-epoch", str(checks),
              "--then-checks-per-epoch", "1", "--epochs", str(SEED_EPOCHS), "--seed", str(SEED), "--out", out], env)
    baseline90 = load(out)
    result["baseline_to90"] = baseline90["seconds_to_target"]
    result["baseline_to90_epochs"] = baseline90["epochs_to_target"]
    result["baseline_accuracy"] = baseline90["test_accuracy"]
    result["baseline_train_seconds"] = baseline90["train_seconds"]

    out = os.path.join(scratch, f"default-{index}.json")
    job = os.path.join(scratch, f"default-{index}")
    measured([python, "bench/probes.py", "to-accuracy", "--target", "0.9", "--checks-per-epoch", str(checks),
              "--then-checks-per-epoch", "1", "--out", out, "--",
              "--dataset", FASHION, "--job-dir", job], env)
    default = load(out)
    result["default_to90"], result["default_to90_epochs"] = default["seconds_to_target"], default["epochs_to_target"]
    result["default_accuracy"], result["default_train_seconds"] = default["test_accuracy"], default["train_seconds"]
    result["default_epochs"] = default["epochs"]
    curves = dict(seed_notebook=baseline90["checks"], default_recipe=default["checks"])
    return result, curves


def plot(curves_per_round, rounds, machine, path):
    """accuracy_vs_time.png: test accuracy against training seconds, every round a thin line per side."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(8, 5))
    sides = (("seed_notebook", "seed notebook (Keras fit, seeded)", "tab:gray", "baseline"),
             ("default_recipe", "this trainer, default recipe", "tab:blue", "default"))
    for key, label, colour, prefix in sides:
        for index, curves in enumerate(curves_per_round):
            points = curves[key]
            reached = rounds[index][f"{prefix}_to90"]
            axes.plot([p["train_seconds"] for p in points], [p["accuracy"] for p in points], color=colour,
                      linewidth=1, alpha=0.8, marker=".", markersize=3,
                      label=f"{label}: 90% after {statistics.median(r[f'{prefix}_to90'] for r in rounds):.0f} s "
                            f"(median)" if index == 0 else None)
            if reached:
                axes.axvline(reached, color=colour, linewidth=0.5, linestyle=":")
    axes.axhline(0.9, color="black", linewidth=0.6, linestyle="--")
    axes.set_ylim(0.75, 0.95)
    axes.set_xlabel("training seconds (test-accuracy checks excluded)")
    axes.set_ylabel("test accuracy (Fashion-MNIST, 10,000 examples)")
    axes.set_title(f"Test accuracy against training time, {len(curves_per_round)} rounds\n{machine}", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def median_round(rounds, numerator, denominator):
    """' (median round 1.23x)': the median of the per-round ratios, beside the table's ratio of medians."""
    ratios = [r[numerator] / r[denominator] for r in rounds if r[numerator] and r[denominator]]
    return f" (median round {statistics.median(ratios):.2f}x)" if ratios else ""


def pairs_median(rounds, key):
    """'; median pair 1.23x of 9': the median of every pair's trainer-over-notebook ratio, all rounds."""
    ratios = [ratio for r in rounds for ratio in r.get(key, [])]
    return f"; median pair {statistics.median(ratios):.2f}x of {len(ratios)}" if ratios else ""


def table(medians, rounds, checks):
    m = medians
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "n/a"  # noqa: E731
    recipe_rows = [] if "default_accuracy" not in m else [
        (f"Training time to 90% test accuracy (s; test accuracy checked {checks} times an epoch)",
         f"{m['baseline_to90']:.1f} ({m['baseline_to90_epochs']:.2f} epochs)",
         f"{m['default_to90']:.1f} with the default recipe ({m['default_to90_epochs']:.2f} epochs; "
         f"{ratio(m['baseline_to90'], m['default_to90'])} sooner)" if m["default_to90"] else "not reached"),
        ("Test accuracy after each recipe's own epochs",
         f"{m['baseline_accuracy']:.4f} ({SEED_EPOCHS} epochs, {m['baseline_train_seconds']:.0f} s training)",
         f"{m['default_accuracy']:.4f} with the default recipe ({m['default_epochs']:.0f} epochs, seed {SEED}, "
         f"{m['default_train_seconds']:.0f} s training)"),
    ]
    rows = [
        ("Training throughput, seed architecture, 2-epoch job, first epoch's tracing included (examples/s)",
         f"{m['baseline_eps']:,.0f}",
         f"{m['trainer_eps']:,.0f} ({ratio(m['trainer_eps'], m['baseline_eps'])}{pairs_median(rounds, 'pair_ratios')}; "
         f"{m['trainer_eps'] / m['ceiling_eps']:.0%} of the {m['ceiling_eps']:,.0f} ceiling)"),
        ("Training throughput, seed architecture, steady state: the same job's second epoch alone (examples/s)",
         f"{m['baseline_steady_eps']:,.0f}",
         f"{m['trainer_steady_eps']:,.0f} ({ratio(m['trainer_steady_eps'], m['baseline_steady_eps'])}"
         f"{pairs_median(rounds, 'pair_steady_ratios')}; "
         f"{m['trainer_steady_eps'] / m['ceiling_eps']:.0%} of the ceiling)"),
        ("Whole process, 2-epoch job to saved model (s)", f"{m['baseline_wall']:.1f}", f"{m['trainer_wall']:.1f}"),
        *recipe_rows,
        ("Peak resident memory, 2-epoch job (MiB)", f"{m['baseline_rss']:,.0f}", f"{m['trainer_rss']:,.0f}"),
        ("`python -m trainer.task --help` (s)", "", f"{m['help_seconds']:.2f}"),
    ]
    lines = [f"| measure (median of {len(rounds)} rounds) | seed notebook | this trainer |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    each = lambda text: ", ".join(text(r) for r in rounds)  # noqa: E731
    pair_figures = lambda key: "; ".join(", ".join(f"{x:.2f}x" for x in r.get(key, [])) for r in rounds)  # noqa: E731
    lines += ["", "Per round (trainer over seed notebook unless said otherwise; each round's figure is the median "
              "of its pairs of 2-epoch jobs):", "",
              f"- throughput, every pair (rounds apart by ';'): {pair_figures('pair_ratios')}; steady state "
              f"{pair_figures('pair_steady_ratios')}",
              "- throughput, 2-epoch job (tracing included): "
              f"{each(lambda r: ratio(r['trainer_eps'], r['baseline_eps']))} "
              f"({each(lambda r: format(r['trainer_eps'], ',.0f'))} against "
              f"{each(lambda r: format(r['baseline_eps'], ',.0f'))} examples/s)",
              f"- throughput, steady state (second epoch): "
              f"{each(lambda r: ratio(r['trainer_steady_eps'], r['baseline_steady_eps']))} "
              f"({each(lambda r: format(r['trainer_steady_eps'], ',.0f'))} against "
              f"{each(lambda r: format(r['baseline_steady_eps'], ',.0f'))} examples/s)",
              f"- ceiling: {each(lambda r: format(r['ceiling_eps'], ',.0f'))} examples/s; trainer's 2-epoch "
              f"throughput over it {each(lambda r: format(r['trainer_eps'] / r['ceiling_eps'], '.0%'))}"]
    if "default_to90" in rounds[0]:
        seconds = lambda key: lambda r: f"{r[key]:.1f} s" if r[key] else "not reached"  # noqa: E731
        lines += [f"- time to 90%: seed notebook {each(seconds('baseline_to90'))} "
                  f"(epochs {each(lambda r: format(r['baseline_to90_epochs'] or 0, '.2f'))}); default recipe "
                  f"{each(seconds('default_to90'))} "
                  f"(epochs {each(lambda r: format(r['default_to90_epochs'] or 0, '.2f'))}); "
                  f"seed notebook over default {each(lambda r: ratio(r['baseline_to90'], r['default_to90']))}"
                  f"{median_round(rounds, 'baseline_to90', 'default_to90')}",
                  f"- default recipe after its {rounds[0]['default_epochs']} epochs: test accuracy "
                  f"{each(lambda r: format(r['default_accuracy'], '.4f'))}, training "
                  f"{each(lambda r: format(r['default_train_seconds'], '.0f') + ' s')}"]
    return "\n".join(lines)


def machine_name():
    """CPU model and core count, Python version: what results.md names as the machine."""
    try:
        with open("/proc/cpuinfo") as handle:
            model = re.search(r"^model name\s*: (.*)$", handle.read(), re.MULTILINE).group(1).strip()
    except (OSError, AttributeError):
        model = "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, Python {sys.version.split()[0]}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=3,
                        help="pairs of 2-epoch jobs (seed notebook, trainer) per round for measures 1, 2 and 5")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--checks-per-epoch", type=int, default=10,
                        help="how often both sides check the test accuracy for measure 3 (the checks' time is "
                             "excluded); the first check at or above 90%% ends the clock")
    parser.add_argument("--skip-recipe", action="store_true",
                        help="leave out measures 3 and 4 (time to 90%% and the default recipe's full run: "
                             "most of the benchmark's time; no accuracy_vs_time.png)")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    rounds, curves = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(args.rounds):
            started = time.perf_counter()
            result, round_curves = one_round(scratch, index, env, recipe=not args.skip_recipe,
                                             checks=args.checks_per_epoch, pairs=args.pairs)
            rounds.append(result)
            curves.append(round_curves)
            print(f"round {index + 1}/{args.rounds} done in {time.perf_counter() - started:.0f} s: "
                  f"{json.dumps(result)}", flush=True)
    medians = {key: statistics.median(r[key] for r in rounds if r[key] is not None)
               if any(r[key] is not None for r in rounds) else None
               for key in rounds[0] if not isinstance(rounds[0][key], list)}
    machine = machine_name()
    text = table(medians, rounds, args.checks_per_epoch)
    print(f"\n{machine}\n{text}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(dict(machine=machine, rounds=rounds, medians=medians, curves=curves), handle, indent=2)
    command = (f"python bench/benchmark.py --rounds {args.rounds}{f' --pairs {args.pairs}' if args.pairs != 3 else ''}"
               f"{' --skip-recipe' if args.skip_recipe else f' --checks-per-epoch {args.checks_per_epoch}'}")
    picture = ""
    if not args.skip_recipe:
        plot(curves, rounds, machine, os.path.join(args.out, "accuracy_vs_time.png"))
        picture = ("\n![test accuracy against training seconds](accuracy_vs_time.png)\n\naccuracy_vs_time.png: "
                   "test accuracy against training seconds from the same run, every round a thin line per side.\n")
    with open(os.path.join(args.out, "results.md"), "w") as handle:
        handle.write(f"Machine: {machine}. Command: `{command}`.\n\n{text}\n{picture}")

if __name__ == "__main__":
    main()
