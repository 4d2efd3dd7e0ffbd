"""What the tests build, one home for each: tiny random models, Hugging Face folders, transformers references.

torch, transformers and tokenizers load only when a builder runs, so a test
that needs just a folder of zeros stays light.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import pytest

TINY_VOCAB = 128
# The shape every tiny random model shares: small enough for the CPU and the Triton
# interpreter, 4 query heads over 2 KV heads; spread-out weights (initializer_range)
# give spread-out logits, so greedy choices are far from ties.
TINY = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)
TINY_WINDOW = 8  # the sliding window of the tiny models that slide
# What makes a tiny Gemma 3 one: a head_dim that is not hidden / heads, its attention scale,
# and sliding layers around a global one.
_GEMMA3 = dict(head_dim=32, sliding_window=TINY_WINDOW, query_pre_attn_scalar=24,
               layer_types=["sliding_attention", "full_attention", "sliding_attention"])


def tiny_config(arch: str, **overrides):
    """A transformers config of `arch` (llama, mistral, qwen2, qwen3, gemma3) in the TINY shape, `overrides` on top."""
    transformers = pytest.importorskip("transformers")
    classes = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
               "gemma3": transformers.Gemma3TextConfig}
    specific = {"gemma3": _GEMMA3, "qwen3": dict(head_dim=32)}.get(arch, {})
    return classes[arch](**{**TINY, **specific, **overrides})


def random_model(config, *, seed: int = 0, perturbed: bool = False):
    """A transformers model with random weights (torch seeded with `seed`), in eval mode.

    `perturbed`: norm weights and biases start at constants; make each distinct, so a
    swapped or forgotten one shows.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    if perturbed:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name or name.endswith(".bias"):
                    param.add_(torch.randn(param.shape, generator=gen) * 0.3)
    return model


def tiny_model(arch: str):
    """(model, config): a perturbed tiny llama, qwen3 or gemma3, for the kernel wiring tests."""
    config = tiny_config(arch)
    return random_model(config, perturbed=True), config


def save_tiny(config, folder: Path, *, seed: int = 0, perturbed: bool = False) -> Path:
    """A random model of `config` saved as a Hugging Face folder (config.json and safetensors)."""
    random_model(config, seed=seed, perturbed=perturbed).save_pretrained(folder)
    return folder


def tiny_llama_with_tokenizer(folder: Path, text: str) -> Path:
    """A tiny random Llama with a real byte-level BPE tokenizer trained on `text`, saved as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([text] * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
    )
    return save_tiny(config, folder)


def zero_llama_shards(folder: Path) -> dict[str, Path]:
    """A 2-layer Llama of zeros as a Hugging Face folder: config.json, tokenizer settings, two safetensors shards.

    No torch: numpy and safetensors only; for tests of what is read about a model, not of running it.
    """
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir()
    config = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 2048}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    shapes = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64)}
    for i in range(2):
        tensors = {f"model.layers.{i}.self_attn.{n}.weight": np.zeros(shape, np.float16) for n, shape in shapes.items()}
        for n, shape in (("gate_proj", (128, 64)), ("up_proj", (128, 64)), ("down_proj", (64, 128))):
            tensors[f"model.layers.{i}.mlp.{n}.weight"] = np.zeros(shape, np.float16)
        if i == 0:
            tensors["model.embed_tokens.weight"] = np.zeros((256, 64), np.float16)
        save_file(tensors, str(folder / f"model-0000{i + 1}-of-00002.safetensors"))
    return {f.name: f for f in folder.iterdir()}


# -- transformers' answers on the real models ----------------------------------------------------


def cached_reference(request, name: str, key: str, compute: Callable[[], dict]) -> dict:
    """`compute()` (transformers' answers, tensors and lists), computed once and kept across sessions.

    Loading a real model in transformers takes many seconds; its answers are kept in
    pytest's cache (or the system's temporary folder under -p no:cacheprovider) under
    `name` and a hash of `key` (what changes the answers: the file, the prompt, a
    version the test bumps) with the torch and transformers versions.
    """
    import torch
    import transformers

    digest = hashlib.sha256(f"{key}|{transformers.__version__}|{torch.__version__}".encode()).hexdigest()[:20]
    cache = getattr(request.config, "cache", None)
    folder = Path(cache.mkdir("native-reference")) if cache is not None else Path(tempfile.gettempdir()) / "localllm-native-reference"
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"{name}-{digest}.pt"
    if file.is_file():
        return torch.load(file)
    answers = compute()
    partial = file.with_suffix(f".{os.getpid()}.tmp")
    torch.save(answers, partial)
    partial.replace(file)
    return answers


def transformers_gguf_model(path: Path):
    """transformers' own load of a GGUF file, dequantized to float32: the reference the native engine is held to."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def permute_for_llama_cpp(w, n_heads: int):
    """llama.cpp's converter order for Q/K rows (a numpy array): per head, the two rotary halves interleaved."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
