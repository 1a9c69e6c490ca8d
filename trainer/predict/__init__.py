"""`python -m trainer.predict --model-dir DIR image.png ...` (also `mnist-predict`): one line per image, class,
name, probability, for a model exported by trainer.task.

- `reading`: what a path is (regular file, an inherited pipe, or refused), decoding within limits, pixels;
- `cleanup`: an object (ink, a garment) told from its background, for photos, scans and canvas exports;
- `preprocess`: an image to the model's input (its size, grey or colour), as its training images were made
  (training_images.json);
- `loading`: the model folder checked, its class names, its training images, classification;
- `cli`: the command line.
"""

from trainer.predict.cleanup import Blank, background, ink, noise_sigma, otsu_threshold
from trainer.predict.cli import Result, main, predict, write_show
from trainer.predict.loading import Model, classify, classify_top, open_model
from trainer.predict.preprocess import centre_like_mnist, fill_frame, frame, load_image, to_mnist, to_model_input
from trainer.predict.reading import image_to_rgb, open_image

__all__ = ["Blank", "Model", "Result", "background", "centre_like_mnist", "classify", "classify_top", "fill_frame",
           "frame", "image_to_rgb", "ink", "load_image", "main", "noise_sigma", "open_image", "open_model",
           "otsu_threshold", "predict", "to_mnist", "to_model_input", "write_show"]
