"""Predict on Fashion-MNIST's own test images as image files, against the model's serving signature.

    python bench/predict_fashion.py --model-dir RUN/model --images DIR [--count 300] [--idx FOLDER]

Writes the first --count test images in several forms under DIR and classifies each set with
`python -m trainer.predict` (a fresh process, as a user runs it):

- `png`: the 28x28 grayscale images as they are (what the serving signature gets);
- `inverted`: the same, dark garment on white;
- `photo`: the garment 4x larger (112x112, bicubic), dark on warm off-white paper, RGB JPEG quality 90;
- `placed`: the garment 3x larger, dark on white, off-centre on a 200x150 page (PNG);
- `png, no training_images.json`: the `png` set with a copy of the model folder without the file, as a
  model exported before it existed (every image cleaned up and framed as a digit).

Prints one Markdown table row per set: right answers, images refused, and seconds for the command.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist"
PAPER = np.array([232, 224, 206], dtype=np.float32)


def write_sets(images, out):
    """{set name: [paths]} for the images in each form."""
    from PIL import Image

    sets = {name: [] for name in ("png", "inverted", "photo", "placed")}
    for name in sets:
        os.makedirs(os.path.join(out, name), exist_ok=True)
    for i, image in enumerate(images):
        stem = f"{i:04d}"
        path = os.path.join(out, "png", f"{stem}.png")
        Image.fromarray(image).save(path)
        sets["png"].append(path)
        path = os.path.join(out, "inverted", f"{stem}.png")
        Image.fromarray(255 - image).save(path)
        sets["inverted"].append(path)
        big = np.asarray(Image.fromarray(image).resize((112, 112), Image.Resampling.BICUBIC), dtype=np.float32) / 255
        photo = PAPER * (1 - big[..., None]) + 20 * big[..., None]
        path = os.path.join(out, "photo", f"{stem}.jpg")
        Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(path, quality=90)
        sets["photo"].append(path)
        page = Image.new("L", (200, 150), 255)
        page.paste(Image.fromarray(255 - image).resize((84, 84), Image.Resampling.BILINEAR), (100, 40))
        path = os.path.join(out, "placed", f"{stem}.png")
        page.save(path)
        sets["placed"].append(path)
    return sets


def run_predict(model_dir, paths):
    """(predicted class per path, -1 where refused; seconds)."""
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "trainer.predict", "--model-dir", model_dir, *paths], cwd=ROOT,
                            env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    answers = {line.split("\t")[0]: int(line.split("\t")[1].split()[0]) for line in result.stdout.splitlines()}
    return np.array([answers.get(path, -1) for path in paths]), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--images", required=True, help="folder for the image files it writes")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--idx", default=FASHION)
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    import tensorflow as tf

    from trainer.data import load_idx_folder

    arrays = load_idx_folder(args.idx)
    images, labels = arrays["test_images"][:args.count], arrays["test_labels"][:args.count].astype(int)
    serving = tf.saved_model.load(args.model_dir).signatures["serving_default"]
    served = serving(image=tf.constant(images))["classes"].numpy()
    n, right = len(labels), int((served == labels).sum())
    print(f"| serving_default on the arrays | {right}/{n} ({right / n:.1%}) | - | - |")
    sets = write_sets(images, args.images)
    legacy = os.path.join(args.images, "model-without-training-images")
    shutil.rmtree(legacy, ignore_errors=True)
    shutil.copytree(args.model_dir, legacy, ignore=shutil.ignore_patterns("training_images.json"))
    runs = [(name, args.model_dir, paths) for name, paths in sets.items()]
    runs.append(("png, no training_images.json", legacy, sets["png"]))
    for name, model_dir, paths in runs:
        predicted, seconds = run_predict(model_dir, paths)
        right, refused = int((predicted == labels).sum()), int((predicted < 0).sum())
        print(f"| predict: {name} | {right}/{n} ({right / n:.1%}) | {refused} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
