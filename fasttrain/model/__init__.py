"""The model: the transformer (tokens -> logits), its FP8 matrix multiplies on GPUs that have them (fp8),
generation with its KV cache, and its weights on disk (safetensors in fasttrain's or Hugging Face's Llama
layout)."""
