"""A stand-in for nanochat (github:karpathy/nanochat), for gpu_check's dry run where no checkout is carried: the
interface benchmarks/studies/time_to_quality.py's train_nanochat and benchmarks/studies/gpu_quality.py call, with a
toy model behind it. Written for this repository; none of nanochat's code."""
