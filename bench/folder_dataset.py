"""A folder of image files as a dataset, end to end: build it, train on it, classify other images with it.

    python bench/folder_dataset.py --out DIR [--per-class 400] [--epochs 4]

Writes DIR/garments: four Fashion-MNIST classes (t-shirt, trouser, sneaker, bag; the first --per-class
training garments of each), each garment tinted with a random hue and saved as a 36x36 RGB JPEG in its
class's subfolder (the test suite's folder, tests/test_any_dataset.py), and DIR/photos: one other garment
of each class from Fashion-MNIST's test split, tinted and saved as a 70x90 JPEG. Then runs, as a user
would, `python -m trainer.task --dataset folder:DIR/garments --epochs N --job-dir DIR/run` and
`python -m trainer.predict --model-dir DIR/run/model --top 2 --show DIR/seen.png DIR/photos/*.jpg`, and
prints the run's shape line, test accuracy and training time, and predict's lines.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist"


def write_photos(folder, classes, seed=7):
    """One Fashion-MNIST test garment of each class (the fourth), tinted, saved as a 70x90 JPEG NAME.jpg."""
    from PIL import Image
    from test_any_dataset import hue_colours

    from trainer.data import load_idx_folder

    arrays = load_idx_folder(FASHION)
    images, labels = arrays["test_images"], arrays["test_labels"]
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for label, name in classes.items():
        index = np.flatnonzero(labels == label)[3]
        rgb = (images[index][..., None].astype(np.float32) * hue_colours(1, rng)[0]).astype(np.uint8)
        paths.append(os.path.join(folder, f"{name}.jpg"))
        Image.fromarray(rgb).resize((70, 90), Image.Resampling.BILINEAR).save(paths[-1], quality=90)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-class", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    from test_any_dataset import GARMENTS, write_colour_garments

    garments, run = os.path.join(args.out, "garments"), os.path.join(args.out, "run")
    if os.path.exists(run):
        raise SystemExit(f"{run} exists: choose an empty --out")
    write_colour_garments(garments, GARMENTS, args.per_class)
    photos = write_photos(os.path.join(args.out, "photos"), GARMENTS)
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    trained = subprocess.run([sys.executable, "-m", "trainer.task", "--dataset", f"folder:{garments}", "--epochs",
                              str(args.epochs), "--job-dir", run], cwd=ROOT, env=env, capture_output=True, text=True)
    if trained.returncode:
        raise SystemExit(trained.stderr[-3000:])
    with open(os.path.join(run, "metrics.json")) as handle:
        metrics = json.load(handle)
    print(next(line for line in trained.stdout.splitlines() if line.startswith("dataset ")))
    print(f"test accuracy {metrics['test_accuracy']:.4f}; {metrics['train_seconds']:.1f} s of training")
    predicted = subprocess.run([sys.executable, "-m", "trainer.predict", "--model-dir", os.path.join(run, "model"),
                                "--top", "2", "--show", os.path.join(args.out, "seen.png"), *photos], cwd=ROOT,
                               env=env, capture_output=True, text=True)
    print(predicted.stdout.strip() or predicted.stderr[-3000:])


if __name__ == "__main__":
    main()
