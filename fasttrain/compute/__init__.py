"""Where and how a run computes: the device, precision, kernels and seeds (device), the measured kernel dispatch
table (kernel_table), and processes under torchrun (distributed).

Imports from fasttrain: nothing.

Modules, in reading order: kernel_table, device, distributed. They import the floors below (system, config):
device reads the config's precision and kernels. docs/architecture.md has the tour.
"""
