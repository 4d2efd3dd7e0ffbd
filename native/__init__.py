"""The native engine: a PyTorch LLM engine with a paged KV cache and continuous batching.

Installed as the top-level package `native` (see pyproject.toml). Importing this
package does not import torch; the modules that need it import it themselves, so
the rest of localllm keeps working where torch is missing.

Reading order: engine.py (the step loop) -> scheduler.py -> block_manager.py ->
model_runner.py -> models/ and layers/ -> sampler.py. config.py, loader.py and
tokenizer.py turn a model file or folder into what those need.
"""

import os

# torch's CPU threads come from OpenMP, whose workers spin while they wait. When
# another process holds a core (the API server's other work, a second model, a
# test run) spinning workers stall each other: a decode step of the starter took
# 300-1000 ms instead of ~100 ms here with 2 threads on 2 busy cores. Waiting
# passively costs microseconds per matrix product. OpenMP reads this once, when
# torch loads, so it only applies if the engine is imported first; an explicit
# setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
