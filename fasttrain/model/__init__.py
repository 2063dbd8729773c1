"""The model: the transformer (tokens -> logits), generation with its KV cache, and its weights on disk
(safetensors in fasttrain's or Hugging Face's Llama layout)."""
