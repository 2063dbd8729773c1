"""The model: the transformer (tokens -> logits), an ensemble of them trained side by side, its FP8 matrix
multiplies on GPUs that have them (fp8), generation with its KV cache, what a Llama holds (llama), its weights on
disk (safetensors in fasttrain's or Hugging Face's Llama layout; a GGUF file for llama.cpp, gguf_export). The shape
a run chooses for its compute is the plan's (fasttrain/planning/).

Imports from fasttrain: nothing.

Modules, in reading order: attention, transformer, ensemble, fp8, generation, llama, weights, gguf_export. They
import the floors below (system, config, compute) and formats' tokenizer (a Llama export writes it).
docs/architecture.md has the tour.
"""
