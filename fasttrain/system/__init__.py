"""The process and its files, below everything else: how errors reach the user and end the process (errors),
files written whole or not at all (atomic), one process per run directory (run_lock), stopping on a signal
(signals) and how loaded the machine is now (machine_load).

Imports from fasttrain: nothing.

Modules, in reading order: errors, atomic, run_lock, signals, machine_load. They import nothing of fasttrain's but each other,
so every other folder may use them. docs/architecture.md has the tour.
"""
