"""localllm: local LLM inference with a terminal UI, a localhost API and self-fitting engines."""

__version__ = "0.1.0"
