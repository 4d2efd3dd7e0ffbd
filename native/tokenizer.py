"""Tokenizers: llama.cpp's own for GGUF files, the `tokenizers` library for HF folders.

For a GGUF model the engine tokenizes exactly as the llama.cpp backend does,
through a vocabulary-only llama.cpp model (no weights are loaded). Streaming
needs each token's bytes (a token may end inside a UTF-8 character; the
backend's TextStream reassembles them), so both tokenizers expose `piece`.
Control tokens (<eos>, <end_of_turn>, ...) have no text: their piece is b"".
"""

from __future__ import annotations

import json
import threading
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from localllm.core.errors import BadModelFile
from localllm.core.hf_info import read_tokenizer_config
from localllm.engine_kit.llama_glue import route_llama_logs, token_piece


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eog_ids: set[int]  # tokens that end generation
    add_bos: bool  # whether raw prompts start with BOS

    def encode(self, text: str, *, add_bos: bool, special: bool) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def piece(self, token: int) -> bytes: ...

    def close(self) -> None: ...


def load_tokenizer(path: Path, *, verbose: bool = False) -> Tokenizer:
    path = Path(path)
    return HFTokenizer(path) if path.is_dir() else GGUFTokenizer(path, verbose=verbose)


class GGUFTokenizer:
    """llama.cpp's tokenizer from a GGUF file, loaded with vocab_only."""

    def __init__(self, path: Path, *, verbose: bool = False) -> None:
        import llama_cpp
        from llama_cpp import _internals

        route_llama_logs(llama_cpp, verbose)
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        try:
            self._model = _internals.LlamaModel(path_model=str(path), params=params, verbose=verbose)
        except Exception as exc:
            raise BadModelFile(f"llama.cpp could not read the vocabulary of {path.name}: {exc}") from None
        self._llama_cpp = llama_cpp
        vocab = self._model.vocab
        self.vocab_size = self._model.n_vocab()
        bos = self._model.token_bos()
        self.bos_id = bos if bos >= 0 else None
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.eog_ids = {i for i in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
        self.piece = lru_cache(maxsize=65536)(self._piece)

    def encode(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos, special)

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.piece(i) for i in ids).decode("utf-8", errors="replace")

    def _piece(self, token: int) -> bytes:
        return token_piece(self._llama_cpp, self._model.vocab, token)

    def close(self) -> None:
        self._model.close()


class HFTokenizer:
    """tokenizer.json through the `tokenizers` library, with tokenizer_config.json's settings."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        file = folder / "tokenizer.json"
        if not file.is_file():
            raise BadModelFile(f"{folder} has no tokenizer.json")
        try:
            self._tok = RustTokenizer.from_file(str(file))
            spec = json.loads(file.read_text())
        except Exception as exc:
            raise BadModelFile(f"{file} could not be read ({exc})") from None
        settings = read_tokenizer_config(folder)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = _token_id(self._tok, settings.get("bos_token"))
        eos = _token_id(self._tok, settings.get("eos_token"))
        self.eog_ids = {eos} if eos is not None else set()
        self.add_bos = bool(settings.get("add_bos_token", self.bos_id is not None))
        self._special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self._byte_level = _is_byte_level(spec)
        self._byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        self.piece = lru_cache(maxsize=65536)(self._piece)
        self._encode_lock = threading.Lock()  # encode_special_tokens is a setting of the shared tokenizer

    def encode(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        with self._encode_lock:
            self._tok.encode_special_tokens = not special  # raw text: "<eos>" is five characters
            ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.piece(i) for i in ids).decode("utf-8", errors="replace")

    def _piece(self, token: int) -> bytes:
        if token in self._special:
            return b""
        text = self._tok.id_to_token(token)
        if text is None:
            return b""
        if self._byte_level:
            try:
                return bytes(self._byte_decoder[c] for c in text)
            except KeyError:  # an added token written as plain text
                return text.encode("utf-8")
        if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            return bytes([int(text[3:5], 16)])  # SentencePiece byte fallback
        return text.replace("\u2581", " ").encode("utf-8")

    def close(self) -> None:
        pass


def _token_id(tok, text: str | None) -> int | None:
    return tok.token_to_id(text) if isinstance(text, str) else None


def _is_byte_level(spec: dict) -> bool:
    """GPT-2 style byte-level BPE (Llama 3, Qwen) rather than SentencePiece pieces (Llama 2, Gemma)."""

    def has(node, kind: str) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == kind:
            return True
        return any(has(n, kind) for key in ("decoders", "pretokenizers") for n in node.get(key) or [])

    return has(spec.get("decoder"), "ByteLevel") or has(spec.get("pre_tokenizer"), "ByteLevel")


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, as byte-level BPE vocabularies use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping
