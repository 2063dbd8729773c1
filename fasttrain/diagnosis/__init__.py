"""Diagnosis: why a loss does not go down, found by checking one real batch of a built Trainer.

Imports from fasttrain: nothing.

Modules, in reading order: checks (the loss doctor's checks on a Trainer's batch, each PASS or FAIL with what it
measured and what to look at, and their report).

The floor above training/: it builds nothing itself, but steps the Trainer it is given (its loader, loss, updater and
schedule). Its command line is fasttrain/doctor.py. docs/architecture.md has the tour.
"""
