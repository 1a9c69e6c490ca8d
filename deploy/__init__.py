"""Vertex AI job submission and the Colab TPU notebook (not built yet: see the open issue)."""
