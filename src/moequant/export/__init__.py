"""Leaving moequant: GGUF for llama.cpp, compressed-tensors for vLLM, and the transformers quantizer that
lets ``AutoModelForCausalLM.from_pretrained`` read a moequant checkpoint. Imports ``formats`` and below."""
