"""Checkpoints: a run's saves on disk, its run directory, and a resume.

Imports from fasttrain: nothing.

Modules, in reading order: saves (the names, steps and pointers in a run's checkpoints/), checkpoint_files (what
a save holds; writing, publishing, finding and reading one), sharded_files (a save as a folder every rank writes,
through torch.distributed.checkpoint), checksums (the CRC-32 that finds a damaged file before it is used),
run_directory (a run's directory: new, resumed and --overwrite starts, the tokenizer it keeps), resume (what a
resume checks and restores besides the tensors), checkpoint (the `Checkpointer` a run saves and restores with).

They import the layers below (system, config, data, model) and, at the same layer, training's run_state,
optimizers, schedule and metrics: what a save holds and what a resume says. docs/architecture.md has the tour.
"""
