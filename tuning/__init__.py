"""KerasTuner search over the trainer's conv filters and dropout: `python -m tuning.task`."""
