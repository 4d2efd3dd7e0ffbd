"""Ollama's num_thread and num_gpu: applied when the request loads the model, logged when it was loaded already.

llama.cpp fixes its threads and offloaded layers when a model loads, so a
loaded model keeps its own; the request that loads it chooses them.
"""

from __future__ import annotations

import asyncio

import ollama
import pytest

from server_harness import make_store, served, start_server

from localllm.server.registry import ModelRegistry
from localllm.server.settings import ServerSettings


def test_the_request_that_loads_a_model_sets_its_threads_and_layers(tmp_path, starter_gguf):
    registry = ModelRegistry(ServerSettings(max_loaded=1), store=make_store(tmp_path, {"starter": starter_gguf}))

    async def scenario() -> None:
        first = await registry.acquire("starter", n_ctx=512, load={"n_threads": 1, "n_gpu_layers": 0})
        try:
            assert first.backend.options.n_threads == 1 and first.backend.options.n_gpu_layers == 0
            assert first.model.load == {"n_threads": 1, "n_gpu_layers": 0}
        finally:
            first.release()
        second = await registry.acquire("starter", n_ctx=512, load={"n_threads": 2})
        try:
            assert second.backend is first.backend  # no reload for them
            assert second.model.load == {"n_threads": 1, "n_gpu_layers": 0}
        finally:
            second.release()
        await registry.close()

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def server(tmp_path_factory, starter_gguf):
    home = tmp_path_factory.mktemp("load-options-home")
    make_store(home, {"starter": starter_gguf})
    yield from served(start_server(home, "--ctx", "512"))  # nothing loaded until a request asks


def ignored_lines(server) -> list[str]:
    return [line for line in server.log_text().splitlines() if "options ignored" in line]


def test_num_thread_loads_the_model_then_is_logged_once_it_is_loaded(server):
    client = ollama.Client(host=server.url, timeout=120)
    client.generate(model="starter", prompt="", options={"num_thread": 1})  # an empty prompt loads the model
    assert ignored_lines(server) == []  # applied by the load
    before = len(ignored_lines(server))
    r = client.generate(model="starter", prompt="The sky is", raw=True, options={"num_thread": 2, "num_predict": 2})
    assert r.done
    lines = ignored_lines(server)
    assert len(lines) == before + 1 and "num_thread=2" in lines[-1] and "loaded already" in lines[-1]
    client.generate(model="starter", prompt="The sky is", raw=True, options={"num_thread": 1, "num_predict": 2})
    assert len(ignored_lines(server)) == before + 1  # what it was loaded with: nothing to say
