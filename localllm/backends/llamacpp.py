"""The llama.cpp backend: GGUF models through llama-cpp-python's low-level bindings.

This file is what the llama.cpp backend adds to the shared front half
(local.py: checks, tokenizing, the queue to the engine thread): its tokenizer,
grammar checks, embeddings and engine. The engine (llamacpp_engine.py) runs on its own
thread, the only one that touches the model's context, and decodes every
active request together, one `llama_decode` per step (continuous batching),
with prompt reuse across requests (llamacpp_slots.py).

Context and slots: the KV cache holds `n_ctx` tokens in all, shared by the
`n_parallel` slots (llama.cpp's unified cache). One request may use the whole
context; when many long requests together outgrow it, idle caches go first and
then the youngest request waits, to be recomputed, until there is room.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

from localllm.backends.grammar import check_grammar
from localllm.backends.llamacpp_embedder import EmbedJob, embed_context_size
from localllm.backends.llamacpp_engine import EngineConfig, LlamaCppEngine
from localllm.backends.local import LocalBackend
from localllm.core.context_checks import context_size
from localllm.core.errors import BadRequest
from localllm.core.requests import GenerationRequest
from localllm.core.speculation import SpeculationOptions
from localllm.core.hardware import default_threads
from localllm.core.modelinfo import ModelInfo
from localllm.engine_kit.llama_glue import route_llama_logs

DEFAULT_BATCH = 512
DEFAULT_PARALLEL = 4  # slots when nobody chose (the fit plan will choose later)
DEFAULT_PREFILL_CHUNK = 128  # prompt tokens per step while others generate: ~0.4 s on 2 CPU cores
MAX_PARALLEL = 256  # llama.cpp's LLAMA_MAX_SEQ


@dataclass
class LlamaCppOptions:
    n_ctx: int | None = None  # tokens in the KV cache, shared by all slots; None: min(DEFAULT_CONTEXT, trained)
    n_threads: int | None = None  # None: physical cores
    n_gpu_layers: int = 0
    n_batch: int = DEFAULT_BATCH  # tokens per step
    n_parallel: int = DEFAULT_PARALLEL  # requests decoded together
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    verbose: bool = False
    speculation: SpeculationOptions | None = None  # prompt lookup or a draft GGUF (None: off)


class LlamaCppBackend(LocalBackend):
    name = "llamacpp"
    engine_label = "llama.cpp"

    def __init__(self, model_name: str, info: ModelInfo, options: LlamaCppOptions | None = None) -> None:
        super().__init__(model_name, info)
        self.options = options or LlamaCppOptions()
        self.n_ctx = context_size(self.options.n_ctx, info.context_length)
        self.n_parallel = _check_slots(self.options)
        self._engine = LlamaCppEngine(
            EngineConfig(
                model_path=str(info.path),
                n_ctx=self.n_ctx,
                n_parallel=self.n_parallel,
                n_batch=self.options.n_batch,
                prefill_chunk=min(self.options.prefill_chunk, self.options.n_batch),
                n_threads=self.options.n_threads or default_threads(),
                n_gpu_layers=self.options.n_gpu_layers,
                verbose=self.options.verbose,
                speculation=self.options.speculation.validate() if self.options.speculation else None,
                pooling_type=info.pooling_type,
            ),
            self._control,
        )
        self._start()

    # -- tokens ---------------------------------------------------------------------
    @property
    def _model(self):
        return self._engine.model

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        """Tokenize with llama.cpp's own tokenizer (read-only, safe from any thread)."""
        return self._model.tokenize(text.encode("utf-8"), add_bos, special)

    def detokenize(self, tokens: list[int]) -> str:
        return self._model.detokenize(tokens).decode("utf-8", errors="replace")

    def _adds_bos(self) -> bool:
        return self.info.add_bos_token

    def _bos_id(self) -> int | None:
        bos = self._model.token_bos()
        return bos if bos >= 0 else None

    def _check_engine_request(self, req: GenerationRequest) -> None:
        params = req.params
        if params.grammar is not None and not req.prepared:
            check_grammar(self._engine.lc, self._model.vocab, params.grammar, params.grammar_triggers)

    # -- embeddings -----------------------------------------------------------
    @property
    def embed_context(self) -> int:
        """The most tokens one embedding input may have."""
        return embed_context_size(self.n_ctx)

    def prepare_embedding(self, inputs: list[str] | list[list[int]], *, truncate: bool = False) -> list[list[int]]:
        """Each input as checked token ids, on any thread (the server calls this off its event loop).

        Text gets the model's special tokens (BOS; CLS and SEP for BERT). An
        input longer than `embed_context` is cut to it with `truncate`, else refused.
        """
        with self._reading_vocabulary():
            return [self._embedding_tokens(i, item, truncate) for i, item in enumerate(inputs)]

    def _embedding_tokens(self, index: int, item: str | list[int], truncate: bool) -> list[int]:
        if isinstance(item, str):
            tokens = self._model.tokenize(item.encode("utf-8"), True, False)
        else:
            tokens = list(item)
            n_vocab = self._engine.n_vocab
            bad = next((t for t in tokens if not isinstance(t, int) or not 0 <= t < n_vocab), None)
            if bad is not None:
                raise BadRequest(f"input[{index}] has token id {bad}, outside the model's vocabulary of {n_vocab}")
        if not tokens:
            raise BadRequest(f"input[{index}] is empty")
        limit = self.embed_context
        if len(tokens) > limit:
            if not truncate:
                raise BadRequest(
                    f"input[{index}] has {len(tokens)} tokens but this model embeds at most {limit} tokens per input; "
                    f"shorten it"
                )
            tokens = tokens[:limit]
        return tokens

    async def embed(self, inputs: list[str] | list[list[int]]) -> list[list[float]]:
        """Unit-length pooled vectors, computed on the engine thread together with other requests' inputs."""
        self._check_open()
        if not inputs:
            return []
        if any(isinstance(item, str) for item in inputs):
            inputs = self.prepare_embedding(inputs)
        loop = asyncio.get_running_loop()
        job = EmbedJob([list(t) for t in inputs], loop, loop.create_future())
        self._control.inbox.put(job)
        return await job.future

    # -- engine thread --------------------------------------------------------
    def _load(self) -> None:
        import llama_cpp

        route_llama_logs(llama_cpp, self.options.verbose)
        self._engine.load()

    def _run(self) -> None:
        self._engine.run()

    def _unload(self) -> None:
        self._engine.unload()


def _check_slots(options: LlamaCppOptions) -> int:
    if not 1 <= options.n_parallel <= MAX_PARALLEL:
        raise BadRequest(f"parallel must be between 1 and {MAX_PARALLEL} (got {options.n_parallel})")
    if options.n_batch < options.n_parallel:
        raise BadRequest(f"the batch ({options.n_batch} tokens) must hold one token of each of {options.n_parallel} slots")
    if options.prefill_chunk < 1:
        raise BadRequest("prefill_chunk must be >= 1")
    return options.n_parallel


def new_request_id() -> str:
    return uuid.uuid4().hex
