"""The native backend behind the Backend interface: the real starter model, real CLI processes."""

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
from localllm.core.errors import BadRequest, NotSupported, PromptTooLong
from localllm.core.modelinfo import read_model_info

FRANCE = "The capital of France is"
FRANCE_IDS = [2, 818, 5279, 529, 7001, 563]
TEXT = "The river runs past the old mill, under the stone bridge and through the village. "


@pytest.fixture(scope="module")
def backend(starter_gguf):
    b = NativeBackend("starter", read_model_info(starter_gguf), NativeOptions(n_ctx=1024, n_threads=1, max_num_seqs=8))
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


def test_greedy_completion_streams_text_and_ends_with_usage_and_timings(backend):
    text, finish, tokens = collect(backend, FRANCE, greedy(max_tokens=12))
    assert text.startswith(" the capital of the country of France")
    assert finish.reason == "length" and finish.error is None
    assert finish.usage.prompt_tokens == 6 and finish.usage.completion_tokens == 12 == len(tokens)
    t = finish.timings
    assert 0 < t.ttft_s <= t.total_s and t.decode_s > 0 and t.prompt_s > 0


def test_stop_string_ends_generation_and_never_leaks(backend):
    text, finish, _ = collect(backend, FRANCE, greedy(max_tokens=40, stop=["never", "France."]))
    assert finish.reason == "stop" and finish.stop_sequence == "France."
    assert text == " the capital of the country of "
    assert backend.stats().kv_blocks_used == 0


def test_abort_mid_stream_ends_with_abort_and_returns_the_blocks(backend):
    text, finish, tokens = collect(backend, FRANCE, greedy(max_tokens=200), request_id="a", stop_after=3)
    assert finish.reason == "abort" and 3 <= len(tokens) < 200
    stats = backend.stats()
    assert stats.kv_blocks_used == 0 and stats.kv_blocks_total > 0 and stats.running == 0


def test_a_client_that_stops_listening_aborts_its_request(backend):
    async def go():
        finished_before = backend.stats().requests_finished
        agen = backend.generate(GenerationRequest("gone", FRANCE, greedy(max_tokens=500)))
        async for event in agen:
            assert isinstance(event, TokenEvent)
            break
        await agen.aclose()
        for _ in range(200):  # the engine thread finishes it shortly
            stats = backend.stats()
            if stats.requests_finished > finished_before:
                return stats.kv_blocks_used == 0
            await asyncio.sleep(0.05)
        return False

    assert asyncio.run(go())
    text, finish, _ = collect(backend, FRANCE, greedy(max_tokens=2), request_id="gone")  # the id is free again
    assert finish.reason == "length"


def test_concurrent_requests_are_batched_and_each_gets_its_own_tokens(backend):
    prompts = [TEXT[: 20 + 15 * i] for i in range(4)]
    alone = [collect(backend, p, greedy(max_tokens=10), request_id=f"alone{i}")[0] for i, p in enumerate(prompts)]

    async def together():
        jobs = [_collect(backend, p, greedy(max_tokens=10), f"c{i}") for i, p in enumerate(prompts)]
        return await asyncio.gather(*jobs)

    results = asyncio.run(together())
    assert [text for text, _, _ in results] == alone
    assert all(finish.reason == "length" for _, finish, _ in results)
    assert backend.stats().requests_finished >= 8


def test_repeated_prompt_reuses_the_prefix_cache(backend):
    long = TEXT * 4
    collect(backend, long, greedy(max_tokens=2), request_id="p1")
    _, finish, _ = collect(backend, long, greedy(max_tokens=2), request_id="p2")
    assert finish.usage.cached_prompt_tokens >= 16
    assert backend.stats().prefix_cache_hit_rate > 0


def test_logprobs_name_the_token_and_its_alternatives(backend):
    _, _, tokens = collect(backend, FRANCE, greedy(max_tokens=2, logprobs=3))
    lp = tokens[0].logprobs[0]
    assert lp["token"] == tokens[0].token_ids[0] == 506 and lp["text"] == " the"
    assert [t["token"] for t in lp["top"]][:3] == [506, 496, 9079]
    assert lp["logprob"] == lp["top"][0]["logprob"] <= 0


def test_bad_requests_are_refused_before_they_queue(backend):
    with pytest.raises(NotSupported, match="grammar") as refused:
        collect(backend, FRANCE, greedy(grammar='root ::= "a"'))
    assert refused.value.alternative == "llamacpp"
    with pytest.raises(PromptTooLong, match="context") as refused:
        collect(backend, list(range(5, 1030)), greedy())
    assert (refused.value.prompt_tokens, refused.value.context) == (1025, backend.n_ctx)
    with pytest.raises(BadRequest, match="empty"):
        collect(backend, [], greedy())


# -- through the CLI, with a Hugging Face folder --------------------------------------------


def _tiny_hf_folder(folder: Path) -> Path:
    """A tiny random Llama with a real byte-level BPE tokenizer, saved as an HF folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT] * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return _tiny_hf_folder(tmp_path_factory.mktemp("hf") / "tiny-llama")


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
