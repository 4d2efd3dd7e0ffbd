"""What both local engines share below the backends: llama.cpp glue and the n-gram proposer.

Nothing here imports above `localllm.core`, so `native/` and `localllm/backends/` can both use it.
"""
