"""Training: a run of a config, from its plan to its last step.

Imports from fasttrain: nothing.

Modules, in reading order: plan_table (the plan, fasttrain/planning/, as --dry-run prints it), trainer (the `Trainer`:
assembles a run and takes a step), run_loop (the loop between the steps, and final/ at its end), policies (after a bad
step, early stopping, which weights end a run), calibration (the scale of final/'s output layer), launch (taking up
the run directory), reporting and metrics (what a run tells: console, metrics.jsonl, TensorBoard, MFU), phases (a
distilled run's loop of phases: rounds of members, then their student, each decided when the one before it ends),
measure (--dry-run --measure), diagnosis (the loss doctor's checks, on a built Trainer), plain_loop (`train_loop`, for
code that brings its own model and data).

They import the floors below (system, config, compute, formats, preparation, data, model, checkpoints, evaluation,
optimization: the loss, the optimizers and the schedule they run; planning: the run's plan). docs/architecture.md has
the tour.
"""
