"""The curated catalog: it parses, every entry is complete, and it ships inside the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

import pytest

from localllm.store.catalog import REQUIRED_FIELDS, catalog_reasoning, default_catalog, parse_catalog
from localllm.store.store import SMOLLM2_NAME

SOURCE = Path(__file__).resolve().parents[1] / "models" / "catalog.toml"
# The models the issue names, by their Ollama-style names.
WANTED = {
    "llama3.2:1b", "llama3.2:3b", "llama3.1:8b", "qwen2.5:0.5b", "qwen2.5:1.5b", "qwen2.5:3b", "qwen2.5:7b",
    "qwen2.5:14b", "qwen2.5-coder:7b", "gemma3:1b", "gemma3:4b", "gemma3:12b", "mistral:7b", "phi4-mini:3.8b",
    "smollm2:135m",
}
# Reasoning and tool-calling models (issue 18), by Ollama's names; mixtures of experts with their expert counts.
WANTED_REASONING = {
    "qwen3:0.6b", "qwen3:1.7b", "qwen3:4b", "qwen3:8b", "qwen3:14b", "qwen3:30b", "deepseek-r1:1.5b",
    "deepseek-r1:7b", "deepseek-r1:8b-llama-distill", "deepseek-r1:14b", "gpt-oss:20b",
}
WANTED_TOOLS = {"gemma3:1b-it-qat", "gemma3:4b-it-qat", "gemma3:12b-it-qat", "mistral-small3.2:24b"}
MIXTURES = {"qwen3:30b": 128, "gpt-oss:20b": 32}
# Quants other than Q4_K_M, and why: the packaged smollm2 file; Gemma's QAT target; gpt-oss's trained format.
DEFAULT_QUANTS = {SMOLLM2_NAME: "Q4_1", "gemma3:1b-it-qat": "Q4_0", "gemma3:4b-it-qat": "Q4_0",
                  "gemma3:12b-it-qat": "Q4_0", "gpt-oss:20b": "MXFP4"}
# Embedding models by Ollama's names (pull names as written, then the aliases).
WANTED_EMBEDDING = {"nomic-embed-text", "all-minilm", "bge-m3", "qwen3-embedding:0.6b"}


def test_every_entry_has_every_field():
    raw = tomllib.loads(SOURCE.read_text())["model"]
    assert len(raw) >= 12
    for entry in raw:
        for key, kind in REQUIRED_FIELDS.items():
            assert isinstance(entry.get(key), kind) and entry[key], (entry.get("name"), key)


def test_the_catalog_holds_the_curated_chat_models():
    catalog = default_catalog()
    assert WANTED <= {e.name for e in catalog.entries}
    for e in catalog.entries:
        if e.is_embedding:
            continue
        assert e.kv_heads < e.heads and e.heads % e.kv_heads == 0, f"{e.name} is not grouped-query attention"
        assert "gguf" in e.gguf_repo.lower() and e.gguf_repo != e.source_repo
        assert e.default_quant == DEFAULT_QUANTS.get(e.name, "Q4_K_M")
        assert e.context_length >= 8192 and e.parameter_count > 100_000_000
    assert default_catalog().get("qwen2.5").name == "qwen2.5:7b"  # an alias is a family's default size


def test_the_catalog_holds_reasoning_tool_and_moe_models_by_ollama_names():
    catalog = default_catalog()
    for name in WANTED_REASONING | WANTED_TOOLS:
        found = catalog.lookup(name)
        assert found is not None and found[1] is None, name
        entry = found[0]
        assert entry.reasoning == (name in WANTED_REASONING), name
        assert entry.experts == MIXTURES.get(name, 0) and entry.is_moe == (name in MIXTURES), name
    assert {e.name for e in catalog.entries if e.experts} == set(MIXTURES)
    assert not any(e.reasoning for e in catalog.entries if e.name not in WANTED_REASONING)
    # aliases and NAME:QUANT resolve as for the older entries
    assert catalog.get("qwen3").name == "qwen3:8b" and catalog.get("qwen3:30b-a3b").name == "qwen3:30b"
    assert catalog.get("gpt-oss").name == "gpt-oss:20b" and catalog.get("mistral-small3.2").name == "mistral-small3.2:24b"
    entry, quant = catalog.lookup("deepseek-r1:8b-llama-distill:Q8_0")
    assert (entry.source_repo, quant) == ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "Q8_0")


def test_catalog_reasoning_names_installed_catalog_models_only():
    assert catalog_reasoning("qwen3:8b") is True and catalog_reasoning("qwen3:8b:Q8_0") is True
    assert catalog_reasoning("deepseek-r1:7b") is True and catalog_reasoning("gpt-oss") is True
    assert catalog_reasoning("qwen2.5:7b") is False
    assert catalog_reasoning("hf:someone/Some-GGUF:Q4_K_M") is None and catalog_reasoning("my-model") is None


def test_the_catalog_holds_embedding_models_by_ollama_names():
    catalog = default_catalog()
    for name in WANTED_EMBEDDING:
        entry = catalog.get(name)
        assert entry is not None and entry.is_embedding, name
        assert "gguf" in entry.gguf_repo.lower() and entry.gguf_repo != entry.source_repo
        assert entry.context_length >= 512 and entry.heads % entry.kv_heads == 0
    assert catalog.get("nomic-embed-text").name == "nomic-embed-text:v1.5"
    assert not catalog.get("qwen2.5:7b").is_embedding


def test_the_packaged_catalog_is_the_source_file():
    """importlib.resources finds the catalog in this (editable) install, and it is models/catalog.toml."""
    packaged = resources.files("localllm.store").joinpath("catalog.toml").read_text(encoding="utf-8")
    assert packaged == SOURCE.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda e: e.pop("gguf_repo"), "needs gguf_repo"),
        (lambda e: e.update(context_length="big"), "needs context_length"),
        (lambda e: e.update(gguf_repo="not a repo"), "is not ORG/REPO"),
        (lambda e: e.update(parameters="seven"), "is not like 7.61B"),
        (lambda e: e.update(name="Bad Name"), "not a valid model name"),
        (lambda e: e.update(extra=1), "unknown field"),
        (lambda e: e.update(kind="reranker"), "kind must be one of"),
        (lambda e: e.update(reasoning="yes"), "reasoning must be true or false"),
        (lambda e: e.update(experts=1), "experts must be 0"),
        (lambda e: e.update(experts=-8), "experts must be 0"),
    ],
)
def test_broken_entries_are_named(change, message):
    entry = {
        "name": "x:1b", "description": "d", "gguf_repo": "o/x-GGUF", "source_repo": "o/x", "parameters": "1B",
        "context_length": 4096, "license": "mit", "default_quant": "Q4_K_M", "heads": 8, "kv_heads": 2,
    }
    change(entry)
    text = "[[model]]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in entry.items())
    with pytest.raises(ValueError, match=message):
        parse_catalog(text)


def test_duplicate_names_are_refused():
    one = '[[model]]\nname = "a:1b"\naliases = ["a"]\ndescription = "d"\ngguf_repo = "o/a"\nsource_repo = "o/b"\n'
    one += 'parameters = "1B"\ncontext_length = 4096\nlicense = "mit"\ndefault_quant = "Q4_K_M"\nheads = 4\nkv_heads = 1\n'
    with pytest.raises(ValueError, match="used twice"):
        parse_catalog(one + one.replace('name = "a:1b"', 'name = "a:2b"'))


def test_ls_catalog_lists_every_entry(tmp_path):
    env = {**os.environ, "LOCALLLM_HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "localllm", "ls", "--catalog", "--json"], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert {r["name"] for r in rows} == {e.name for e in default_catalog().entries}
    assert not any(r["installed"] for r in rows)
    by_name = {r["name"]: r for r in rows}
    assert by_name["qwen3:30b"]["experts"] == 128 and by_name["qwen3:30b"]["reasoning"] is True
    assert by_name["mistral-small3.2:24b"]["reasoning"] is False and by_name["gpt-oss:20b"]["default_quant"] == "MXFP4"
    table = subprocess.run(
        [sys.executable, "-m", "localllm", "ls", "--catalog"], capture_output=True, text=True, env=env, timeout=60
    ).stdout
    assert "deepseek-r1:8b-llama-distill" in table and "gemma3:4b-it-qat" in table
    assert "MoE" in next(line for line in table.splitlines() if line.startswith("gpt-oss:20b"))
