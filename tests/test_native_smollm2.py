"""The native engine on the default chat model, SmolLM2 135M Instruct (Llama, Q4_1 GGUF).

The reference is transformers' own GGUF load in float32 (about 16 s), run once
per module on a chat-templated prompt: the prompt's logits and 24 greedy
tokens. Its answers are kept in pytest's cache (or the system's temporary
directory), keyed by the file, the versions and the prompt, so later sessions
skip the load.
"""

from __future__ import annotations

import native  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

import pytest
import torch

from localllm.core.requests import SamplingParams
from localllm.core.modelinfo import read_model_info
from localllm.store.bundled import SMOLLM2_SHA256
from localllm.store.store import DEFAULT_CHAT_MODEL
from native.engine import EngineOptions, LLMEngine
from test_smollm2 import assert_answers, chat_turn
from builders import cached_reference, transformers_gguf_model

SKY = "Why is the sky blue?"  # an answer longer than the 24 tokens compared
GREEDY_TOKENS = 24
REFERENCE_VERSION = 1  # bump when what the fixture computes changes
THREADS = 1  # shared machines: one thread stays predictable (see test_native_starter.py)


@pytest.fixture(scope="module")
def engine(smollm2_gguf):
    e = LLMEngine(smollm2_gguf, EngineOptions(device="cpu", threads=THREADS, n_ctx=512, max_num_seqs=2, weights="float32"))
    yield e
    e.close()


@pytest.fixture(scope="module")
def sky_ids(engine, smollm2_gguf) -> list[int]:
    """The question through the model's own chat template, tokenized as llama.cpp does."""
    from localllm.core.chat_template import resolve_template

    info = read_model_info(smollm2_gguf)
    template = resolve_template(info.chat_template, info.architecture, model_name=DEFAULT_CHAT_MODEL,
                                bos_token=info.bos_token, eos_token=info.eos_token)
    prompt = template.render([{"role": "user", "content": SKY}])
    return engine.tokenizer.encode(prompt, add_bos=False, special=True)


@pytest.fixture(scope="module")
def reference(smollm2_gguf, sky_ids, request) -> dict:
    """transformers' logits and greedy tokens for the prompt: one load per module, cached across sessions."""
    pytest.importorskip("transformers")

    def compute() -> dict:
        model = transformers_gguf_model(smollm2_gguf)
        with torch.inference_mode():
            logits = model(torch.tensor([sky_ids])).logits[0]
            greedy = model.generate(torch.tensor([sky_ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False)
        return {"logits": logits.clone(), "greedy": greedy[0, len(sky_ids) :].tolist()}

    return cached_reference(request, "smollm2", f"{SMOLLM2_SHA256}|{REFERENCE_VERSION}|{sky_ids}", compute)


def test_the_gguf_config_is_smollm2s(engine):
    c = engine.config
    assert c.family == "llama" and c.n_layers == 30 and c.n_heads == 9 and c.n_kv_heads == 3 and c.head_dim == 64
    assert c.vocab_size == 49152 and c.tie_embeddings


def test_prompt_logits_match_transformers_gguf_load(engine, sky_ids, reference):
    logits = engine.prompt_logits(sky_ids)
    expected = reference["logits"]
    worst = max(float((logits[i] - expected[i]).norm() / expected[i].norm()) for i in range(expected.shape[0]))
    assert worst < 1e-3


def test_greedy_tokens_through_the_chat_template_match_transformers(engine, sky_ids, reference):
    assert len(reference["greedy"]) == GREEDY_TOKENS  # the answer did not end early: all 24 are compared
    assert engine.generate([sky_ids], SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS))[0] == reference["greedy"]


def test_a_greedy_chat_turn_on_the_native_engine_answers(smollm2_gguf):
    from localllm.backends.native import NativeBackend, NativeOptions

    backend = NativeBackend(DEFAULT_CHAT_MODEL, read_model_info(smollm2_gguf), NativeOptions(n_ctx=512, n_threads=THREADS, max_num_seqs=1, weights="float32"))
    try:
        assert_answers(chat_turn(backend))
    finally:
        backend.close()
