"""Evaluation: how good a model is, and why it does not learn.

Imports from fasttrain: nothing.

Modules, in reading order: validation (loss, accuracy, perplexity and bits per byte on held-out rows, as a run
validates), trained_model (a run's weights loaded back for sampling and scoring), harness (lm-evaluation-harness
tasks on a trained model; needs the `eval` extra), diagnosis (the loss doctor's checks on a built Trainer).

They import the layers below (system, config, data, model) and, at the same layer, training and checkpoints;
the Trainer imports validation. docs/architecture.md has the tour.
"""
