"""Vertex AI job submission (`python -m deploy.vertex`) and the Colab TPU notebook (colab_tpu.ipynb)."""
