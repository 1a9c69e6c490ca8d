"""One worker of a two-worker MultiWorkerMirrored cluster (TF_CONFIG set by the test): trains the default
recipe's network for a few steps twice from the same start, once with Keras' own gradient all-reduce and
once with the train step's early, packed sums (steps.adam_class), and writes both results to a JSON file.

    python tests/gradient_sums_worker.py OUT.json
"""

import hashlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(out: str) -> None:
    from trainer.config import parse_config
    from trainer.distribute import configure_host

    configure_host(0, 1, 1)
    import keras
    import numpy as np
    import tensorflow as tf

    from trainer.model import build_model
    from trainer.steps import adam_class, make_train_function

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    config = parse_config(["--job-dir", os.path.dirname(out)], {})
    worker = strategy.cluster_resolver.task_id
    rng = np.random.default_rng(worker)  # each worker its own shard of data
    batch = (rng.random((32, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, 32).astype(np.int32))
    results = {}
    for name, optimizer_class in (("keras", keras.optimizers.Adam), ("early", adam_class(strategy))):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = build_model(config)
            optimizer = optimizer_class(learning_rate=1e-2)
            optimizer.build(model.trainable_variables)
        dataset = tf.data.Dataset.from_tensors(batch).repeat()
        iterator = iter(strategy.distribute_datasets_from_function(lambda context, dataset=dataset: dataset))
        train_steps = make_train_function(strategy, model, optimizer, 64)
        loss_sum, _ = train_steps(iterator, tf.constant(5))
        # trainable weights: batch norm's moving statistics are each worker's own until the epoch's end
        weights = b"".join(np.asarray(weight).tobytes() for weight in model.trainable_weights)
        results[name] = dict(weights=hashlib.sha256(weights).hexdigest(), loss_sum=float(loss_sum),
                             early=bool(getattr(optimizer, "sums_gradients_in_step", False)))
    with open(out, "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[1])
