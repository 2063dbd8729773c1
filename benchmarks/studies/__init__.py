"""The studies: one-off measurements and the drivers of the GPU session, each `python -m benchmarks.studies.NAME`.

Beside the pytest-benchmark suite (benchmarks/bench_*.py), these answer one question each and write a results
file under benchmarks/results/; README.md names each one's question, command and current result.

GPU: gpu_check (the acceptance pack) runs the suite's GPU cases and tune_rms_norm, profile_step, ablation and
hf_patch; report, goals and dispatch_table read what it wrote.
Recipe and sizing: time_to_quality (against nanochat), budget_ladder, recipe_sweep, many_epochs.
The CPU step: cpu_step, isa_spread.
Data, checkpoints, tools: elastic_restarts, export_agreement, config_walk.
README.md also names the studies retired once answered (optimizer_sweep, sizing_fit, busy_machine, ...): they are
in the tree at commit ecc6e19.
common holds what they share: the repository's root, the load average and a results file's first keys.
"""
