"""The export: a SavedModel whose `serving_default` signature takes raw uint8 pixels, a .keras copy of the
network with stock layers, the class names and how the training images are made (training_images.json),
written beside the model folder and swapped in whole (trainer.model_folder), so an interrupted export never
leaves half a model where a good one was.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional, Sequence

from trainer import atomic, model_folder


def serving_signature(model):
    """The one input of `serving_default`: raw uint8 pixels, any batch size: [N, H, W] for a model of grey
    images, [N, H, W, 3] for colour ones (H, W from the model's input)."""
    import tensorflow as tf

    height, width, channels = model.input_shape[1:]
    shape = [None, height, width] if channels == 1 else [None, height, width, channels]
    return [tf.TensorSpec(shape, tf.uint8, name="image")]


def serving_function(model):
    """The `serving_default` computation: uint8 images [N, H, W] or [N, H, W, 3] -> classes and probabilities."""
    import tensorflow as tf

    grey = model.input_shape[-1] == 1

    def serve(image):
        pixels = tf.cast(image, tf.float32)
        pixels = (pixels[..., tf.newaxis] if grey else pixels) / 255.0
        probabilities = model(pixels, training=False)
        return {"classes": tf.argmax(probabilities, axis=-1, output_type=tf.int64), "probabilities": probabilities}

    return serve


def export_model(model, model_dir: str, class_names: Sequence[str], training_images: Optional[dict] = None) -> None:
    """SavedModel (`serving_default`: uint8 image [N,H,W] or [N,H,W,3] -> classes [N] int64, probabilities
    [N,K]);
    `training_images` (from `images.describe_images`) goes to training_images.json when given."""
    import keras

    from trainer.model import stock_model

    staged = model_folder.staging_dir(model_dir)
    try:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(name=model_folder.SIGNATURE, fn=serving_function(model),
                             input_signature=serving_signature(model))
        archive.write_out(staged, verbose=False)
        stock_model(model).save(os.path.join(staged, model_folder.KERAS_FILE))
        with open(os.path.join(staged, model_folder.CLASS_NAMES_FILE), "w") as out:
            json.dump(list(class_names), out)
        if training_images is not None:
            model_folder.write_training_images(staged, training_images)
        atomic.make_readable(staged, directory=True)
        model_folder.swap_in(staged, os.path.abspath(model_dir.rstrip("/")))
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
