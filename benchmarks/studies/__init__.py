"""The studies: one-off measurements and the drivers of the GPU session, each `python -m benchmarks.studies.NAME`.

Beside the pytest-benchmark suite (benchmarks/bench_*.py), these answer one question each and write a results
file under benchmarks/results/; README.md names each one's question, command and current result.

GPU: gpu_check (the acceptance pack) runs the suite's GPU cases and tune_rms_norm, profile_step, ablation and
hf_patch; report, goals and dispatch_table read what it wrote.
Recipe and sizing: time_to_quality (against nanochat), recipe_sweep, sizing_fit, optimizer_sweep.
The CPU step: cpu_step, busy_machine, isa_spread.
Data, checkpoints, tools: prepare_speed, checkpoint_io, checkpoint_checksum, elastic_restarts, lm_eval_speed.
common holds what they share: the repository's root, the load average and a results file's first keys.
"""
