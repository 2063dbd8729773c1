"""Checkpoints: a run's saves on disk, its run directory, and a resume.

Imports from fasttrain: nothing.

Modules, in reading order: run_state (the counters of a run, which a save holds whole), saves (the names, steps
and pointers in a run's checkpoints/), checkpoint_files (what a save holds; writing, publishing, finding and
reading one), sharded_files (a save as a folder every rank writes, through torch.distributed.checkpoint),
checksums (the CRC-32 that finds a damaged file before it is used), run_directory (a run's directory: the names
of its files, new, resumed and --overwrite starts, the tokenizer it keeps), resume (what a resume checks and
restores besides the tensors), checkpoint (the `Checkpointer` a run saves and restores with).

They import the floors below (system, config, compute, data); training/ and evaluation/ stand on them.
docs/architecture.md has the tour.
"""
