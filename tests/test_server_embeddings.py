"""Embeddings through a real server: /v1/embeddings (openai SDK), /api/embed and /api/embeddings (ollama SDK).

The vectors are checked against llama.cpp's own per-token hidden states of
the same model (a separate llama.cpp context in this process), pooled here:
the mean for chat models, the last token for a copy of the starter whose GGUF
says `pooling_type = 3` (an embedding model with its own pooling).
"""

from __future__ import annotations

import re

import httpx
import numpy as np
import ollama
import openai
import pytest

from tests.server_harness import copy_with_uint32_key, make_store, start_server

CAT, KITTEN, TAX = "The cat sat on the mat.", "A kitten rested on the rug.", "Quarterly tax filings are due in April."
POOLING_LAST = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory, starter_gguf, smollm2_gguf):
    home = tmp_path_factory.mktemp("embed-home")
    files = tmp_path_factory.mktemp("embed-files")
    last = copy_with_uint32_key(starter_gguf, files / "starter-last.gguf", "gemma3.pooling_type", POOLING_LAST)
    make_store(home, {"starter": starter_gguf, "starter-last": last, "smollm2": smollm2_gguf})
    srv = start_server(home, "starter", "--ctx", "1024", "--max-loaded", "3", "--threads", "1")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(starter_gguf, smollm2_gguf):
    """llama.cpp contexts that return every token's final hidden state, unpooled.

    Flash attention on, as llama.cpp chooses for the server's contexts on a CPU: without it
    the states differ by ~1e-2 on the starter (another attention kernel, not a mistake)."""
    import llama_cpp

    made = {}

    def get(name: str) -> llama_cpp.Llama:
        if name not in made:
            path = {"starter": starter_gguf, "smollm2": smollm2_gguf}[name]
            made[name] = llama_cpp.Llama(
                model_path=str(path), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE,
                n_ctx=512, n_batch=512, n_ubatch=512, n_threads=1, flash_attn=True, verbose=False,
            )
        return made[name]

    yield get
    for llm in made.values():
        llm.close()


def unit(vector) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float64)
    return v / np.linalg.norm(v)


def embed(client, model: str, inputs, **kwargs) -> np.ndarray:
    reply = client.embeddings.create(model=model, input=inputs, **kwargs)
    return np.array([d.embedding for d in sorted(reply.data, key=lambda d: d.index)])


# -- OpenAI ------------------------------------------------------------------------------


def test_openai_sdk_float_and_base64_agree_and_are_unit_length(client):
    as_base64 = client.embeddings.create(model="starter", input=[CAT, KITTEN])  # the SDK asks for base64
    as_float = client.embeddings.create(model="starter", input=[CAT, KITTEN], encoding_format="float")
    a = np.array([d.embedding for d in as_base64.data])
    b = np.array([d.embedding for d in as_float.data])
    assert a.shape == (2, 640) and [d.index for d in as_float.data] == [0, 1]
    assert np.abs(a - b).max() < 1e-6  # float32 both ways
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens > 2
    assert as_float.model == "starter" and as_float.object == "list"


def test_pooled_vector_is_the_mean_of_llama_cpp_hidden_states(client, reference):
    for model in ("starter", "smollm2"):
        states = np.array(reference(model).embed(TAX))  # one row per token
        expected = unit(states.mean(axis=0))
        got = embed(client, model, TAX, encoding_format="float")[0]
        assert np.abs(got - expected).max() < 1e-4, model


def test_token_input_equals_text_input_and_usage_counts_tokens(client, reference):
    tokens = reference("starter").tokenize(CAT.encode())
    by_text = client.embeddings.create(model="starter", input=CAT, encoding_format="float")
    by_ids = client.embeddings.create(model="starter", input=tokens, encoding_format="float")
    by_id_lists = client.embeddings.create(model="starter", input=[tokens, tokens[:3]], encoding_format="float")
    assert by_text.usage.prompt_tokens == len(tokens)
    assert by_ids.data[0].embedding == by_text.data[0].embedding
    assert by_id_lists.data[0].embedding == by_text.data[0].embedding
    assert by_id_lists.usage.prompt_tokens == len(tokens) + 3


def test_identical_inputs_give_identical_vectors(client):
    v = embed(client, "starter", [KITTEN, KITTEN], encoding_format="float")
    again = embed(client, "starter", [KITTEN, KITTEN], encoding_format="float")
    assert np.array_equal(v[0], v[1]) and np.array_equal(v, again)  # same batch, same bits


def test_a_batch_equals_each_input_alone(client):
    """Sequences pooled in one decode do not mix. On SmolLM2 (Q4_1) the arithmetic is the
    same whatever the batch; the starter's repacked Q4_K matrices take another kernel for a
    different batch shape, so there the bound is looser (a mixed-up sequence is off by >0.1)."""
    texts = [CAT, KITTEN, TAX, "hello"]
    for model, bound in (("smollm2", 1e-4), ("starter", 1e-2)):
        batch = embed(client, model, texts, encoding_format="float")
        alone = np.array([embed(client, model, t, encoding_format="float")[0] for t in texts])
        assert np.abs(batch - alone).max() < bound, model


def test_related_sentences_are_closer_than_unrelated_ones(client):
    for model in ("smollm2", "starter"):
        cat, kitten, tax = embed(client, model, [CAT, KITTEN, TAX], encoding_format="float")
        assert cat @ kitten > cat @ tax + 0.1, model
        assert cat @ kitten > kitten @ tax + 0.1, model


def test_dimensions_truncate_and_renormalise(client):
    full = embed(client, "starter", CAT, encoding_format="float")[0]
    short = embed(client, "starter", CAT, dimensions=64)[0]
    assert short.shape == (64,)
    assert np.abs(short - unit(full[:64])).max() < 1e-5
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="starter", input=CAT, dimensions=641)
    assert caught.value.body["param"] == "dimensions" and "640" in caught.value.body["message"]


def test_errors_are_openai_shaped(server):
    def post(body):
        return httpx.post(f"{server.v1}/embeddings", json=body, timeout=60)

    too_long = post({"model": "starter", "input": "word " * 1100})
    assert too_long.status_code == 400
    error = too_long.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "input" and "1024" in error["message"]
    bad_id = post({"model": "starter", "input": [1, 2, 10**7]})
    assert bad_id.status_code == 400 and "vocabulary" in bad_id.json()["error"]["message"]
    for empty in ("", [], [[]]):
        r = post({"model": "starter", "input": empty})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input", empty
    assert post({"model": "no-such-model", "input": "x"}).status_code == 404
    assert post({"model": "starter", "input": "x", "encoding_format": "int8"}).status_code == 400


# -- an embedding model with its own pooling ---------------------------------------------


def test_embedding_model_pools_its_own_way_and_refuses_chat(server, client, reference):
    states = np.array(reference("starter").embed(TAX))
    got = embed(client, "starter-last", TAX, encoding_format="float")[0]
    assert np.abs(got - unit(states[-1])).max() < 1e-4  # the last token's state, not the mean
    assert np.abs(got - unit(states.mean(axis=0))).max() > 1e-2

    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="starter-last", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert "embedding model" in caught.value.body["message"]
    chat = httpx.post(f"{server.url}/api/chat", json={"model": "starter-last", "messages": [{"role": "user", "content": "Hi"}]}, timeout=60)
    assert chat.status_code == 400 and "embedding model" in chat.json()["error"]

    shown = httpx.post(f"{server.url}/api/show", json={"model": "starter-last"}, timeout=60).json()
    assert shown["capabilities"] == ["embedding"]
    assert "embedding" not in httpx.post(f"{server.url}/api/show", json={"model": "starter"}, timeout=60).json()["capabilities"]


# -- Ollama ------------------------------------------------------------------------------


def test_ollama_sdk_embed_and_legacy_embeddings(server, client):
    ol = ollama.Client(host=server.url, timeout=120)
    reply = ol.embed(model="starter", input=[CAT, KITTEN], keep_alive="5m", options={"num_thread": 1})
    vectors = np.array(reply.embeddings)
    assert vectors.shape == (2, 640) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert reply.prompt_eval_count > 2 and reply.total_duration > 0 and reply.load_duration is not None
    assert np.abs(vectors - embed(client, "starter", [CAT, KITTEN], encoding_format="float")).max() < 1e-6

    assert len(ol.embed(model="starter", input=CAT, dimensions=32).embeddings[0]) == 32
    legacy = ol.embeddings(model="starter", prompt=CAT)
    assert np.abs(np.array(legacy.embedding) - vectors[0]).max() < 1e-6

    long = "word " * 1100  # more than the 1024-token context
    assert len(ol.embed(model="starter", input=long).embeddings) == 1  # truncated, as Ollama does by default
    with pytest.raises(ollama.ResponseError) as caught:
        ol.embed(model="starter", input=long, truncate=False)
    assert caught.value.status_code == 400 and "1024" in caught.value.error
    assert ol.embed(model="starter", input=[]).embeddings == []  # loads the model only


# -- beside a chat stream ----------------------------------------------------------------


def requests_running(server) -> float:
    """The engines' own count of requests in a slot (not the HTTP side's view)."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return float(re.search(r"^localllm_requests_running (\S+)$", text, flags=re.MULTILINE).group(1))


def test_embedding_during_a_chat_stream_leaves_the_stream_unchanged(server, client):
    max_tokens = 128
    request = dict(
        model="starter", messages=[{"role": "user", "content": "Count from one to fifty in words, one per line."}],
        max_tokens=max_tokens, temperature=0, seed=7,
    )
    alone = client.chat.completions.create(**request)
    assert alone.usage.completion_tokens == max_tokens  # so the stream below runs its whole length

    stream = client.chat.completions.create(stream=True, **request)
    parts = [next(stream).choices[0].delta.content or ""]
    vectors = embed(client, "starter", [CAT, KITTEN, TAX] * 4, encoding_format="float")
    assert requests_running(server) == 1  # the stream was generating all the while the embeddings were made
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert "".join(parts) == alone.choices[0].message.content
