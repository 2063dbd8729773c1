"""Planning: what a run decides before it allocates anything, each decision made once (`plan_run`).

Imports from fasttrain: nothing.

Modules, in reading order: plan (`plan_run` and the `RunPlan` it returns: the questions in order), recorded (what a
resumed or replayed run recorded, read back rather than decided or measured again), shape (the model a run trains and
its stop: set, recorded or sized, then its context, batch and members), speed (a machine's training speed as a model's
size changes), timed_pass (what the timing runs: the run's own loss and update), sizing (the shape for the budget, the
corpus and the memory), sequence_length (the context for the tokens planned), batch_size (a time budget's rows for the
tokens planned), members (an ensemble where one model reads the corpus out early, and its distillation's share of the
budget), repeats (how the corpus is read: the rows of an epoch, their worth, the epoch limit and the weight decay),
preflight (the memory a shape needs, and whether it fits).

They import the floors below (system, config, compute, formats, preparation, data, model, checkpoints, evaluation,
optimization); training/ runs what they decide. docs/architecture.md has the plan's page.
"""
