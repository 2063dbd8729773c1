"""`from kernels import ...` in a clone of fasttrain: the kernels of `fasttrain_kernels`, the same objects.

The wheel installs them as `fasttrain_kernels` only, so that Hugging Face's `kernels` package can be installed
beside it; this folder is not in the wheel. Code outside a clone imports `fasttrain_kernels`.
"""

from fasttrain_kernels import *  # noqa: F403
from fasttrain_kernels import __all__ as __all__
