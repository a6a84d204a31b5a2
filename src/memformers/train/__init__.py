"""Training: optimiser groups and schedule, atomic checkpoints, the trainer loop."""
