"""The run's system concerns, below everything else: how errors reach the user (errors), atomic writes
(atomic), the device, precision, kernels and seeds (device), the measured kernel dispatch table (kernel_table),
processes under torchrun (distributed), one run per directory (run_lock) and stopping on a signal (signals).

Imports from fasttrain: nothing.

errors and atomic are the lowest layer and import nothing of fasttrain's but each other; the rest of system/
sits above config (device reads the config's precision and kernels) and below everything else.
"""
