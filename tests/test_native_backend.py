"""The native backend behind the Backend interface: the real starter model, real CLI processes.

What every backend promises (stop strings, abort, concurrency, prefix reuse, logprobs, usage, ...)
is in tests/test_backend_contract.py; here is what is the native engine's own.
"""

from __future__ import annotations

import native  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from localllm.core.requests import GenerationRequest, SamplingParams, TokenEvent
from localllm.backends.native import NativeBackend, NativeOptions
from localllm.core.errors import NotSupported, PromptTooLong
from localllm.core.modelinfo import read_model_info
from waiting import until
from builders import tiny_llama_with_tokenizer

FRANCE = "The capital of France is"
FRANCE_IDS = [2, 818, 5279, 529, 7001, 563]
TEXT = "The river runs past the old mill, under the stone bridge and through the village. "


@pytest.fixture(scope="module")
def backend(starter_gguf):
    b = NativeBackend("starter", read_model_info(starter_gguf), NativeOptions(n_ctx=1024, n_threads=1, max_num_seqs=8, weights="float32"))
    yield b
    b.close()


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, **kw)


async def _collect(backend, prompt, params, request_id, stop_after=None, templated=False):
    text, tokens, finish = "", [], None
    req = GenerationRequest(request_id, prompt, params, templated=templated)
    async for event in backend.generate(req):
        if isinstance(event, TokenEvent):
            tokens.append(event)
            text += event.text
            if stop_after is not None and len(tokens) == stop_after:
                backend.abort(request_id)
        else:
            finish = event
    return text, finish, tokens


def collect(backend, prompt, params=None, *, request_id="r", stop_after=None, templated=False):
    return asyncio.run(_collect(backend, prompt, params or greedy(), request_id, stop_after, templated))


def test_tokenizes_exactly_as_llama_cpp(backend):
    assert backend.tokenize(FRANCE) == FRANCE_IDS
    assert backend.detokenize(FRANCE_IDS[1:]) == FRANCE


def test_chat_prompts_become_the_same_tokens_as_on_llama_cpp(backend, starter_gguf):
    from localllm.backends.llamacpp import LlamaCppBackend, LlamaCppOptions

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river <eos> in France."}]
    reference = LlamaCppBackend("starter", read_model_info(starter_gguf), LlamaCppOptions(n_ctx=256, n_threads=1))
    try:
        for req in (
            GenerationRequest("t", backend.render_chat(messages), templated=True),
            GenerationRequest("r", "Name a river <eos> in France.", templated=False),
        ):
            assert backend.prompt_tokens(req) == reference.prompt_tokens(req)
    finally:
        reference.close()
    prompt = backend.render_chat(messages)
    _, finish, _ = collect(backend, prompt, greedy(max_tokens=4), templated=True)
    assert finish.usage.prompt_tokens == len(backend.prompt_tokens(GenerationRequest("x", prompt, templated=True)))


















def test_every_way_a_request_ends_gives_its_kv_blocks_back(backend):
    """Stopped, aborted, walked away from, refused: the paged cache is empty again."""
    assert backend.stats().kv_blocks_total > 0
    _, finish, _ = collect(backend, FRANCE, greedy(max_tokens=40, stop=["France."]), request_id="stop")
    assert finish.reason == "stop" and backend.stats().kv_blocks_used == 0
    _, finish, _ = collect(backend, FRANCE, greedy(max_tokens=200), request_id="abort", stop_after=3)
    assert finish.reason == "abort" and backend.stats().kv_blocks_used == 0

    async def walk_away():
        finished_before = backend.stats().requests_finished
        agen = backend.generate(GenerationRequest("gone", FRANCE, greedy(max_tokens=500)))
        async for _ in agen:
            break
        await agen.aclose()
        await until(lambda: backend.stats().requests_finished > finished_before, what="the walked-away request ending")

    asyncio.run(walk_away())
    assert backend.stats().kv_blocks_used == 0
    _, finish, _ = collect(backend, FRANCE, greedy(max_tokens=2), request_id="gone")  # the id is free again
    assert finish.reason == "length"


def test_bad_requests_are_refused_before_they_queue(backend):
    with pytest.raises(NotSupported, match="grammar") as refused:
        collect(backend, FRANCE, greedy(grammar='root ::= "a"'))
    assert refused.value.alternative == "llamacpp"
    with pytest.raises(PromptTooLong, match="context") as refused:
        collect(backend, list(range(5, 1030)), greedy())
    assert (refused.value.prompt_tokens, refused.value.context) == (1025, backend.n_ctx)
    assert backend.stats().running == 0


# -- through the CLI, with a Hugging Face folder --------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return tiny_llama_with_tokenizer(tmp_path_factory.mktemp("hf") / "tiny-llama", TEXT)


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOCALLLM_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "localllm", *args], capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL
    )


def test_hf_tokenizer_round_trips_text_through_token_bytes(tiny_folder):
    from native.tokenizer import HFTokenizer

    tok = HFTokenizer(tiny_folder)
    text = "The village bridge, héllo wörld"
    ids = tok.encode(text, add_bos=True, special=False)
    assert ids[0] == tok.bos_id == 0
    assert tok.decode(ids) == text  # BOS has no text; every other byte comes back
    assert tok.eog_ids == {1}


def test_cli_runs_a_hugging_face_folder_on_the_native_engine(tiny_folder, tmp_path):
    shown = _cli("show", str(tiny_folder), "--json", home=tmp_path)
    assert shown.returncode == 0, shown.stderr
    facts = json.loads(shown.stdout)
    assert facts["format"] == "safetensors" and facts["architecture"] == "llama" and facts["n_kv_heads"] == 2
    run = _cli("run", str(tiny_folder), "The river", "--raw", "--temperature", "0", "--max-tokens", "5", "--stats", home=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "output: 5 tokens" in run.stderr and "finish: length" in run.stderr


def test_cli_native_backend_on_the_starter_matches_the_engine(starter_gguf, tmp_path):
    run = _cli(
        "run", str(starter_gguf), FRANCE, "--raw", "--temperature", "0", "--max-tokens", "8",
        "--backend", "native", "--threads", "1", "--ctx", "512", "--kv-cache", "64MiB", home=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(" the capital of the country of France")


def test_cli_explains_a_kv_budget_too_small_for_the_context(starter_gguf, tmp_path):
    run = _cli(
        "run", str(starter_gguf), FRANCE, "--raw", "--backend", "native", "--ctx", "4096", "--kv-cache", "1MiB", home=tmp_path
    )
    assert run.returncode == 1
    assert run.stderr.startswith("error: the KV cache budget") and run.stderr.count("\n") == 1


def test_a_folder_that_is_not_a_model_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    run = _cli("run", str(tmp_path / "empty"), "hi", "--raw", home=tmp_path)
    assert run.returncode == 1 and "no config.json" in run.stderr and run.stderr.count("\n") == 1


def test_the_app_does_not_import_torch_until_the_native_engine_is_used(tiny_folder):
    code = (
        "import sys; import localllm.cli.parser, localllm.cli.commands, localllm.backends.select;"
        "from localllm.store.store import ModelStore;"
        f"info = ModelStore().resolve({str(tiny_folder)!r}, allow_paths=True).info();"
        "assert info.format == 'safetensors';"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
