"""Training: the Trainer and the plain loop, the objective, optimizers and schedule, the policies after
bad steps, checkpoints, validation, what a run reports (reporting, metrics), its counters (run_state),
the memory check before a run allocates (preflight), and a trained model loaded back (trained_model)."""
