"""The model: the transformer (tokens -> logits), an ensemble of them trained side by side, its FP8 matrix
multiplies on GPUs that have them (fp8), generation with its KV cache, its weights on disk (safetensors in
fasttrain's or Hugging Face's Llama layout; a GGUF file for llama.cpp, gguf_export), and its shape and training
context chosen for a run's compute (sizing, at the machine's speed, and sequence_length).

Imports from fasttrain: nothing.

Modules, in reading order: attention, transformer, ensemble, fp8, generation, weights, gguf_export, speed, sizing,
sequence_length. They import the floors below (system, config, compute) and formats' tokenizer (a Llama export
writes it).
docs/architecture.md has the tour.
"""
