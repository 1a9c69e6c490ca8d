"""KerasTuner search over the trainer's filters and dropout (not built yet: see the open issue)."""
