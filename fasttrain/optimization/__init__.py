"""Optimization: what a step computes and how the weights move, whoever runs the steps.

Imports from fasttrain: nothing.

Modules, in reading order: objective (the next-token loss, or distillation's against a teacher), optimizers (AdamW,
Muon, SGD, Adafactor and the clipping), schedule (the learning rate over a run's steps or its time budget).

They import the floors below (system, config, compute, data, model, checkpoints, evaluation); the plan times them
(planning is above) and the Trainer runs them (training).
"""
