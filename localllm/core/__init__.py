"""The ground layer: plain vocabulary every other part speaks.

Errors, units, sampling parameters and generation events, model facts (GGUF and Hugging Face
readers), hardware facts, paths and settings, and sandboxed chat templates. Nothing here
imports from anywhere above it in localllm or native.
"""
