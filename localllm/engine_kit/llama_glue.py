"""llama.cpp glue that the llama.cpp backend and the native engine's GGUF tokenizer both need."""

from __future__ import annotations

import ctypes
import sys

_log_callback = None  # kept alive for as long as llama.cpp may call it


def route_llama_logs(llama_cpp, verbose: bool) -> None:
    """llama.cpp logs to stderr by default; a CLI must print only what it means to."""
    global _log_callback

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if verbose:
            sys.stderr.write(text.decode("utf-8", errors="replace"))

    _log_callback = callback
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


def token_piece(llama_cpp, vocab, token: int, special: bool = False) -> bytes:
    """The bytes of one token as text (control tokens such as <eos> give b"" unless `special`)."""
    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, special)
        if n >= 0:
            return buf.raw[:n]
        size = -n


def single_tokens(model, texts: tuple[str, ...]) -> frozenset[int]:
    """Ids of the texts that the vocabulary holds as one (special) token each, such as harmony's
    ``<|channel|>``: a reply must show those markers for its reader, though they are control tokens."""
    ids = set()
    for text in texts:
        tokens = model.tokenize(text.encode("utf-8"), False, True)
        if len(tokens) == 1:
            ids.add(tokens[0])
    return frozenset(ids)
