"""Multi-worker scaling on one machine: two MultiWorkerMirrored workers (one intra- and one inter-op thread
each) against one worker with one thread, the same global batch and data, in alternating rounds.

    python bench/multiworker_scaling.py [--rounds 3] [--batch-sizes 128,256,512] [--out FILE.md]

Per round, for each global batch size (seed model): one worker, then two (the order swaps every round so
drift in the machine's speed does not favour one side); the default recipe at batch 128; and three probes
that explain the figures:
  ceiling    the seed model's train step in a tight loop on in-memory tensors, one process with one
             thread at the global batch, against two such processes at once at half the batch each: what
             two workers could reach if their communication cost nothing (the machine's own limit: two
             processes share caches, memory bandwidth and turbo budget);
  all-reduce two workers all-reducing tensors shaped like the seed model's gradients (what one training
             step sends), in a tight loop: the collective's own cost per step on 127.0.0.1;
  step time  per worker, the trainer's steady-state step time, split into compute (the ceiling pair's
             step) and the rest (communication, synchronisation and waiting for the slower worker).
Throughput is training only (validation and test excluded): "all" is the trainer's
train_examples_per_second over all epochs (first-epoch tracing included); "steady" is epochs 2..N from
the epoch lines. Data: full Fashion-MNIST from Debian's dataset-fashion-mnist, cut by --train-limit.
`--statistics-sync` alone prints what averaging the default recipe's batch-norm statistics over the
replicas costs per call (once per epoch in the trainer), with two workers and under MirroredStrategy.
BYTES_PER_PACK=N in the environment packs the all-reduce probe's tensors into N-byte collectives
(tf.distribute.experimental.CommunicationOptions); 0, TensorFlow's default, sends one per tensor.
"""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREADS = ["--intra-op-threads", "1", "--inter-op-threads", "1"]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def epoch_rates(log_text):
    """[(examples/s, seconds)] per epoch from the lines `epoch k/N ... R examples/s  S s`."""
    return [(float(rate.replace(",", "")), float(seconds)) for rate, seconds in
            re.findall(r"^epoch \d+/\d+ .* ([\d,]+) examples/s\s+([\d.]+) s", log_text, re.M)]


def steady_rate(log_text):
    """Examples/s over epochs 2..N (epoch 1 if it is alone)."""
    epochs = epoch_rates(log_text)
    later = epochs[1:] or epochs
    return sum(rate * seconds for rate, seconds in later) / sum(seconds for _, seconds in later) if later else None


def cluster_env(ports, index):
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                       "task": {"type": "worker", "index": index}})


def start_all(commands, scratch, env_for):
    """Start one process per command at once; wait for all; returns their logs (raises if one failed)."""
    processes, logs = [], []
    for index, command in enumerate(commands):
        log = tempfile.NamedTemporaryFile("w+", dir=scratch, suffix=f"-{index}.log", delete=False)
        processes.append(subprocess.Popen(command, cwd=ROOT, env=env_for(index), stdout=log,
                                          stderr=subprocess.STDOUT))
        logs.append(log)
    texts = []
    for process, log in zip(processes, logs, strict=True):
        code = process.wait(timeout=1800)
        log.seek(0)
        texts.append(log.read())
        if code != 0:
            raise SystemExit(f"failed ({code}): {' '.join(process.args)}\n{texts[-1][-3000:]}")
    return texts


def base_env():
    return dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")


def train(workers, common, scratch):
    """(all-epochs examples/s, steady examples/s, replicas, [examples/s of each epoch]) of a trainer run with 1
    or 2 workers (the epochs as the chief's log shows them)."""
    job_dir = tempfile.mkdtemp(dir=scratch)
    ports = [free_port() for _ in range(workers)]
    strategy = "multi_worker" if workers > 1 else "default"
    command = [sys.executable, "-m", "trainer.task", *common, "--strategy", strategy, "--job-dir", job_dir, *THREADS]

    def env_for(index):
        return dict(base_env(), **({"TF_CONFIG": cluster_env(ports, index)} if workers > 1 else {}))

    logs = start_all([command] * workers, scratch, env_for)
    with open(os.path.join(job_dir, "metrics.json")) as handle:
        metrics = json.load(handle)
    return (metrics["train_examples_per_second"], steady_rate(logs[0]), metrics["num_replicas"],
            [rate for rate, _ in epoch_rates(logs[0])])


def ceiling(batch_size, scratch):
    """(one process at the batch, two at once at half the batch each: their summed examples/s, and the
    pair's step time in ms)."""
    def probe(count, batch):
        outs = [os.path.join(scratch, f"ceiling-{count}-{batch}-{i}.json") for i in range(count)]
        start_all([[sys.executable, "bench/probes.py", "ceiling", "--out", out, "--", "--preset", "seed",
                    "--batch-size", str(batch), *THREADS] for out in outs], scratch, lambda index: base_env())
        rates = []
        for out in outs:
            with open(out) as handle:
                rates.append(json.load(handle)["examples_per_second"])
        return rates

    one = probe(1, batch_size)[0]
    pair = probe(2, batch_size // 2)
    return one, sum(pair), 1000 * statistics.mean(batch_size / 2 / rate for rate in pair)


def allreduce_worker(out, steps=200):
    """One worker of the all-reduce probe (run with TF_CONFIG): ms per all-reduce of the seed model's
    gradient-shaped tensors, as the training step sends them."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    sys.path.insert(0, ROOT)
    from trainer.config import parse_config
    from trainer.model import build_model

    pack = int(os.environ.get("BYTES_PER_PACK", "0"))
    strategy = tf.distribute.MultiWorkerMirroredStrategy(  # before any op: it configures the runtime
        communication_options=tf.distribute.experimental.CommunicationOptions(bytes_per_pack=pack))
    shapes = [v.shape for v in build_model(parse_config(["--preset", "seed"], {})).trainable_variables]
    with strategy.scope():
        tensors = [tf.Variable(tf.ones(shape)) for shape in shapes]

    @tf.function
    def reduce_once():
        def replica():
            context = tf.distribute.get_replica_context()
            return context.all_reduce(tf.distribute.ReduceOp.SUM, [t.read_value() for t in tensors])
        return strategy.run(replica)

    for _ in range(20):
        reduce_once()
    started = time.perf_counter()
    for _ in range(steps):
        result = reduce_once()
    float(result[0].numpy().flat[0])
    with open(out, "w") as handle:
        json.dump(dict(ms_per_allreduce=1000 * (time.perf_counter() - started) / steps,
                       values=sum(int(tf.size(t)) for t in tensors), tensors=len(tensors)), handle)


def allreduce(scratch):
    ports = [free_port(), free_port()]
    out = os.path.join(scratch, "allreduce.json")
    outs = [out, out + ".1"]
    start_all([[sys.executable, __file__, "--allreduce-worker", outs[i]] for i in range(2)], scratch,
              lambda index: dict(base_env(), TF_CONFIG=cluster_env(ports, index)))
    with open(out) as handle:
        return json.load(handle)


def statistics_sync_worker(out):
    """ms per call of the trainer's batch-norm statistics averaging (steps.make_statistics_sync) for the
    default recipe: under MultiWorkerMirrored with TF_CONFIG set, else MirroredStrategy over two CPU
    devices, where it also records how far the replicas' moving means were apart before averaging."""
    sys.path.insert(0, ROOT)
    from trainer.config import parse_config
    from trainer.distribute import configure_host

    multi = "TF_CONFIG" in os.environ
    configure_host(0 if multi else 2, 1, 1)
    import keras
    import numpy as np
    import tensorflow as tf

    from trainer.steps import build_state, make_statistics_sync, make_train_function

    strategy = tf.distribute.MultiWorkerMirroredStrategy() if multi else \
        tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    config = parse_config(["--job-dir", os.path.dirname(out)], {})
    state = build_state(config, strategy, "float32", 10, None)
    rng = np.random.default_rng(0)
    batch = (rng.random((128, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, 128).astype(np.int32))
    iterator = iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch).repeat()))
    make_train_function(strategy, state.model, state.optimizer, 128)(iterator, tf.constant(5))
    moving = [layer.moving_mean for layer in state.model.layers if isinstance(layer, keras.layers.BatchNormalization)]

    def spread():  # replica 0 against the last replica, this process's copies
        copies = [v.numpy() for v in getattr(moving[0], "values", [moving[0]])]
        return float(np.abs(copies[0] - copies[-1]).max())

    before = None if multi else spread()
    sync = make_statistics_sync(strategy, state.model)
    sync()  # trace
    started = time.perf_counter()
    for _ in range(20):
        sync()
    with open(out, "w") as handle:
        json.dump(dict(ms_per_sync=1000 * (time.perf_counter() - started) / 20, spread_before=before,
                       values=2 * sum(int(np.prod(v.shape)) for v in moving)), handle)


def statistics_sync(scratch):
    """The averaging's cost under both strategies (one call per epoch in the trainer)."""
    ports = [free_port(), free_port()]
    outs = [os.path.join(scratch, f"sync-{i}.json") for i in range(3)]
    start_all([[sys.executable, __file__, "--sync-worker", outs[i]] for i in range(2)], scratch,
              lambda index: dict(base_env(), TF_CONFIG=cluster_env(ports, index)))
    start_all([[sys.executable, __file__, "--sync-worker", outs[2]]], scratch, lambda index: base_env())
    results = []
    for out in outs:
        with open(out) as handle:
            results.append(json.load(handle))
    return dict(multi_worker_ms=[r["ms_per_sync"] for r in results[:2]], mirrored_ms=results[2]["ms_per_sync"],
                mirrored_spread_before=results[2]["spread_before"], values=results[2]["values"])


def one_round(args, index, scratch):
    result = {}
    data = ["--dataset", args.dataset, "--no-resume"]
    for batch in args.batch_sizes:
        common = [*data, "--train-limit", str(args.train_limit), "--epochs", str(args.epochs),
                  "--batch-size", str(batch), "--preset", "seed"]
        order = (1, 2) if index % 2 == 0 else (2, 1)
        for workers in order:
            result[f"seed{batch}_{workers}w"] = train(workers, common, scratch)
    common = [*data, "--train-limit", str(args.default_train_limit), "--epochs", str(args.epochs),
              "--batch-size", "128", "--preset", "default"]
    for workers in ((1, 2) if index % 2 == 0 else (2, 1)):
        result[f"default128_{workers}w"] = train(workers, common, scratch)
    result["ceiling"] = ceiling(args.batch_sizes[0], scratch)
    result["allreduce"] = allreduce(scratch)
    return result


def trainer_round(args, index, scratch):
    """One round in the trainer's own conditions: seed preset, global batch 128, one worker then two (the order
    swapped every other round), plus the probes that split a 2-worker step."""
    common = ["--dataset", args.dataset, "--no-resume", "--preset", "seed", "--batch-size", "128",
              "--train-limit", str(args.train_limit), "--epochs", str(args.epochs)]
    result = {}
    for workers in ((1, 2) if index % 2 == 0 else (2, 1)):
        result[f"{workers}w"] = train(workers, common, scratch)
    result["ceiling"] = ceiling(128, scratch)
    result["allreduce"] = allreduce(scratch)
    return result


def trainer_report(rounds, args, machine):
    """The last epoch's examples/s of 2 workers over 1, per round and the median; where a 2-worker step goes."""
    med = statistics.median
    ratios = [r["2w"][3][-1] / r["1w"][3][-1] for r in rounds]
    step_ms = med([1000 * 128 / r["2w"][3][-1] for r in rounds])
    compute_ms = med([r["ceiling"][2] for r in rounds])
    reduce_ms = med([r["allreduce"]["ms_per_allreduce"] for r in rounds])
    other_ms = step_ms - compute_ms - reduce_ms
    epochs = "; ".join(f"round {i + 1}: 1 worker {', '.join(f'{x:,.0f}' for x in r['1w'][3])}, 2 workers "
                       f"{', '.join(f'{x:,.0f}' for x in r['2w'][3])}" for i, r in enumerate(rounds))
    return "\n".join([
        f"Machine: {machine}. Command: `python bench/multiworker_scaling.py --trainer --rounds {len(rounds)} "
        f"--train-limit {args.train_limit} --epochs {args.epochs}` (seed preset, global batch 128, one thread per "
        "worker).", "",
        "| | 1 worker (ex/s, last epoch) | 2 workers (ex/s, last epoch) | scaling |", "|---|---|---|---|",
        *[f"| round {i + 1} | {r['1w'][3][-1]:,.0f} | {r['2w'][3][-1]:,.0f} | {ratio:.2f}x |"
          for i, (r, ratio) in enumerate(zip(rounds, ratios, strict=True))],
        f"| **median** | {med([r['1w'][3][-1] for r in rounds]):,.0f} | {med([r['2w'][3][-1] for r in rounds]):,.0f} "
        f"| **{med(ratios):.2f}x** |", "",
        f"Every epoch (examples/s): {epochs}.", "",
        f"A 2-worker step (medians): {step_ms:.1f} ms = compute {compute_ms:.1f} ms (two ceiling processes at once, "
        f"batch 64 each) + gradient all-reduce {reduce_ms:.1f} ms (the probe's) + other {other_ms:.1f} ms."])


def report(rounds, args, machine):
    med = lambda values: statistics.median(values)  # noqa: E731
    lines = [f"Machine: {machine}. Command: `python bench/multiworker_scaling.py --rounds {len(rounds)}"
             f" --batch-sizes {','.join(map(str, args.batch_sizes))} --train-limit {args.train_limit} "
             f"--epochs {args.epochs}`.", "",
             "| model, global batch | 1 worker steady (ex/s) | 2 workers steady (ex/s) | scaling steady | "
             "scaling all epochs | per round (steady) |", "|---|---|---|---|---|---|"]
    for key, label in [*[(f"seed{b}", f"seed, {b}") for b in args.batch_sizes], ("default128", "default recipe, 128")]:
        one = [r[f"{key}_1w"] for r in rounds]
        two = [r[f"{key}_2w"] for r in rounds]
        steady = [t[1] / o[1] for o, t in zip(one, two, strict=True)]
        overall = [t[0] / o[0] for o, t in zip(one, two, strict=True)]
        lines.append(f"| {label} | {med([o[1] for o in one]):,.0f} | {med([t[1] for t in two]):,.0f} | "
                     f"{med(steady):.2f}x | {med(overall):.2f}x | {', '.join(f'{x:.2f}x' for x in steady)} |")
    batch = args.batch_sizes[0]
    ceilings = [r["ceiling"] for r in rounds]
    limit = [pair / one for one, pair, _ in ceilings]
    reduce_ms = med([r["allreduce"]["ms_per_allreduce"] for r in rounds])
    compute_ms = med([c[2] for c in ceilings])
    step_ms = med([1000 * batch / r[f"seed{batch}_2w"][1] for r in rounds])
    lines += ["", f"Ceiling (seed train step on in-memory tensors, one thread per process): one process at batch "
                  f"{batch} {med([c[0] for c in ceilings]):,.0f} ex/s; two at once at batch {batch // 2} each "
                  f"{med([c[1] for c in ceilings]):,.0f} ex/s together: {med(limit):.2f}x is the most two workers "
                  f"can scale here (per round {', '.join(f'{x:.2f}x' for x in limit)}).",
              "",
              f"Where a 2-worker step of global batch {batch} goes (seed model, medians): {step_ms:.1f} ms per "
              f"step in the trainer; compute alone {compute_ms:.1f} ms (the ceiling pair's step at batch "
              f"{batch // 2}); the rest, {step_ms - compute_ms:.1f} ms, is communication and synchronisation. "
              f"The all-reduce of the {rounds[0]['allreduce']['tensors']} gradient tensors "
              f"({rounds[0]['allreduce']['values']:,} float32 values) alone takes {reduce_ms:.1f} ms per call "
              f"between two workers on 127.0.0.1 (per round "
              f"{', '.join(format(r['allreduce']['ms_per_allreduce'], '.1f') for r in rounds)})."]
    return "\n".join(lines)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--allreduce-worker":
        return allreduce_worker(sys.argv[2])
    if len(sys.argv) == 3 and sys.argv[1] == "--sync-worker":
        return statistics_sync_worker(sys.argv[2])
    if sys.argv[1:] == ["--statistics-sync"]:
        with tempfile.TemporaryDirectory() as scratch:
            return print(json.dumps(statistics_sync(scratch)))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="idx:/usr/share/datasets/fashion-mnist")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-sizes", default="128,256,512",
                        type=lambda text: [int(x) for x in text.split(",")])
    parser.add_argument("--trainer", action="store_true",
                        help="only the trainer's own conditions: seed preset, global batch 128, the last epoch's "
                             "examples/s (defaults --train-limit 30000 --epochs 3)")
    parser.add_argument("--train-limit", type=int, default=None, help="default 15000 (30000 with --trainer)")
    parser.add_argument("--default-train-limit", type=int, default=4000,
                        help="training examples for the default recipe's pair (it is several times slower)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default=None, help="default bench/results/multiworker.md "
                                                    "(multiworker-trainer.md with --trainer)")
    args = parser.parse_args()
    args.train_limit = args.train_limit or (30000 if args.trainer else 15000)
    args.out = args.out or os.path.join(ROOT, "bench", "results", "multiworker-trainer.md" if args.trainer
                                        else "multiworker.md")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown CPU") if os.path.exists("/proc/cpuinfo") else "unknown CPU"
    machine = f"{os.cpu_count()} cores ({cpu}), Python {sys.version.split()[0]}"
    rounds = []
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(args.rounds):
            started = time.perf_counter()
            rounds.append((trainer_round if args.trainer else one_round)(args, index, scratch))
            print(f"round {index + 1}/{args.rounds} in {time.perf_counter() - started:.0f} s: "
                  f"{json.dumps(rounds[-1])}", flush=True)
    text = (trainer_report if args.trainer else report)(rounds, args, machine)
    print("\n" + text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        handle.write(text + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as handle:
        json.dump(dict(machine=machine, rounds=rounds), handle, indent=1)


if __name__ == "__main__":
    main()
