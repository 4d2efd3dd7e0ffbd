"""LangChain's embeddings clients against a live server: OpenAIEmbeddings on /v1/embeddings, OllamaEmbeddings on /api/embed.

RAG tools built on LangChain embed their documents and queries this way. The
vectors must be the ones the server gives its own SDK clients for the same
text, and the same text must embed the same as a document and as a query.
"""

from __future__ import annotations

import numpy as np
import ollama
import openai
import pytest
from langchain_ollama import OllamaEmbeddings
from langchain_openai import OpenAIEmbeddings

from server_harness import make_store, start_server, served

CAT, KITTEN, TAX = "The cat sat on the mat.", "A kitten rested on the rug.", "Quarterly tax filings are due in April."
KEY = "unused"  # the server runs without a key; the clients insist on one
WIDTH = 640  # the starter's hidden size: one pooled vector's length


@pytest.fixture(scope="module")
def server(tmp_path_factory, starter_gguf):
    home = tmp_path_factory.mktemp("langchain-home")
    make_store(home, {"starter": starter_gguf})
    srv = start_server(home, "starter", "--ctx", "1024", "--threads", "1")
    yield from served(srv)


def cosine(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def check(documents, query, reference) -> None:
    assert np.asarray(documents).shape == (3, WIDTH) and len(query) == WIDTH
    np.testing.assert_allclose(documents, reference, atol=1e-5)
    np.testing.assert_allclose(query, documents[0], atol=1e-5)  # a query embeds as the same text as a document
    assert cosine(documents[0], documents[1]) > cosine(documents[0], documents[2])


def test_openai_embeddings(server):
    embeddings = OpenAIEmbeddings(base_url=server.v1, api_key=KEY, model="starter", check_embedding_ctx_length=False, max_retries=0)
    documents = embeddings.embed_documents([CAT, KITTEN, TAX])
    query = embeddings.embed_query(CAT)
    client = openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0, timeout=120)
    reply = client.embeddings.create(model="starter", input=[CAT, KITTEN, TAX], encoding_format="float")
    check(documents, query, [d.embedding for d in sorted(reply.data, key=lambda d: d.index)])


def test_ollama_embeddings(server):
    embeddings = OllamaEmbeddings(base_url=server.url, model="starter")
    documents = embeddings.embed_documents([CAT, KITTEN, TAX])
    query = embeddings.embed_query(CAT)
    reference = ollama.Client(host=server.url, timeout=120).embed(model="starter", input=[CAT, KITTEN, TAX]).embeddings
    check(documents, query, reference)
