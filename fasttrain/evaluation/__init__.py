"""Evaluation: how good a model is, and why it does not learn.

Imports from fasttrain: nothing.

Modules, in reading order: loss_sums (a batch's loss as sums, and perplexity: what the step and validation
both count in), validation (loss, accuracy, perplexity and bits per byte on held-out rows, as a run validates),
trained_model (a run's weights loaded back for sampling and scoring), harness (lm-evaluation-harness tasks on a
trained model; needs the `eval` extra).

They import the floors below (system, config, compute, formats, data, model, checkpoints); training/ stands on
them, its Trainer validating as it goes. The loss doctor's checks, which step a Trainer, are training/diagnosis.py.
docs/architecture.md has the tour.
"""
