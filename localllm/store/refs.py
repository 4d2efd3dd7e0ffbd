"""MODEL syntax: what a name on the command line (or in an API call) refers to.

    NAME                 a catalog entry at its default quant     qwen2.5:7b
    NAME:QUANT           a catalog entry at another quant         qwen2.5:7b:Q8_0
    hf:ORG/REPO:QUANT    the GGUF in a repository whose name carries the quant
    hf:ORG/REPO/PATH.gguf  one GGUF file (every part when it is a split GGUF)
    hf:ORG/REPO          a safetensors snapshot: config, tokenizer, weights

`hf.co/ORG/REPO...` (Ollama's spelling) means the same as `hf:ORG/REPO...`.
Each reference has one canonical name, the name it is installed under, so
`qwen2.5`, `qwen2.5:7b` and `qwen2.5:7b:q4_k_m` are one model.

Also here: reading a quant and split-part numbers out of a GGUF file name,
which is how `hf:ORG/REPO:QUANT` picks its file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from localllm.core.errors import BadRequest
from localllm.store.catalog import Catalog, CatalogEntry, default_catalog

HF_PREFIXES = ("hf:", "hf.co/", "huggingface.co/", "https://huggingface.co/")
SYNTAX = "hf:ORG/REPO:QUANT, hf:ORG/REPO/FILE.gguf or hf:ORG/REPO"

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_REPO = re.compile(rf"^{_PART}/{_PART}$")
_QUANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
# llama.cpp's gguf-split names: PREFIX-00001-of-00003.gguf (some repos add "-split")
_SPLIT = re.compile(r"^(?P<prefix>.+?)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
# A quant label at the end of a file stem: Q4_K_M, q8_0, IQ4_XS, BF16, f16, UD-Q4_K_XL, TQ1_0, MXFP4...
_QUANT_AT_END = re.compile(
    r"(?:^|[-_.])(?P<quant>(?:UD-)?(?:I?Q\d(?:_[A-Z0-9]+)*|TQ\d_\d|MXFP4(?:_[A-Z0-9]+)*|BF16|F16|F32|FP16|FP32))$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ModelRef:
    """A model that can be pulled from the hub."""

    name: str  # the canonical name it is installed under
    kind: str  # "quant": a GGUF picked by quant; "file": one GGUF path; "snapshot": safetensors
    repo: str
    quant: str | None = None
    path: str | None = None
    revision: str = "main"
    catalog: CatalogEntry | None = None


def is_hf_ref(text: str) -> bool:
    return text.startswith(HF_PREFIXES)


def quant_given(text: str) -> bool:
    """False for a catalog name without a quant (`qwen2.5:7b`), where the planner may choose one."""
    found = default_catalog().lookup(text.strip())
    return found is None or found[1] is not None


def parse_ref(text: str, catalog: Catalog | None = None) -> ModelRef | None:
    """The ModelRef a MODEL argument names, or None when it is no catalog name or hf: reference.

    A malformed hf: reference is a BadRequest that shows the syntax.
    """
    text = text.strip()
    if is_hf_ref(text):
        return _parse_hf(text)
    found = (catalog or default_catalog()).lookup(text)
    if found is None:
        return None
    entry, quant = found
    if quant is not None and not _QUANT.match(quant):
        raise BadRequest(f"'{quant}' is not a quant name (like Q4_K_M or Q8_0)")
    quant = (quant or entry.default_quant).upper()
    name = entry.name if quant == entry.default_quant.upper() else f"{entry.name}:{quant}"
    return ModelRef(name=name, kind="quant", repo=entry.gguf_repo, quant=quant, catalog=entry)


def _parse_hf(text: str) -> ModelRef:
    body = text
    for prefix in HF_PREFIXES:
        if body.startswith(prefix):
            body = body[len(prefix) :]
            break
    bad = BadRequest(f"'{text}' is not a valid hub reference; use {SYNTAX}")
    parts = body.split("/")
    if len(parts) < 2:
        raise bad
    org, rest = parts[0], parts[1:]
    if len(rest) == 1:  # hf:ORG/REPO or hf:ORG/REPO:QUANT
        repo_name, sep, quant = rest[0].partition(":")
        repo = f"{org}/{repo_name}"
        if not _REPO.match(repo) or repo_name.endswith((".", "-")):
            raise bad
        if not sep:
            return ModelRef(name=f"hf:{repo}", kind="snapshot", repo=repo)
        if not _QUANT.match(quant):
            raise bad
        quant = quant.upper()
        return ModelRef(name=f"hf:{repo}:{quant}", kind="quant", repo=repo, quant=quant)
    repo = f"{org}/{rest[0]}"
    path = "/".join(rest[1:])
    if not _REPO.match(repo) or not _safe_path(path) or not path.lower().endswith(".gguf"):
        raise bad
    return ModelRef(name=f"hf:{repo}/{path}", kind="file", repo=repo, path=path)


def _safe_path(path: str) -> bool:
    """A relative path inside a repository: no empty, `.` or `..` segments, no backslashes."""
    segments = path.split("/")
    return bool(path) and "\\" not in path and all(s not in ("", ".", "..") for s in segments)


# -- GGUF file names ------------------------------------------------------------------


@dataclass(frozen=True)
class SplitPart:
    prefix: str  # the path without "-0000k-of-0000n.gguf"
    number: int  # 1-based
    count: int


def split_part(path: str) -> SplitPart | None:
    """Which part of a split GGUF a path is, or None for a whole file."""
    m = _SPLIT.match(path)
    if not m:
        return None
    number, count = int(m["no"]), int(m["count"])
    if not 1 <= number <= count:
        return None
    return SplitPart(m["prefix"], number, count)


def quant_of(path: str) -> str | None:
    """The quant label in a GGUF file name, upper case: `qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf` -> Q4_K_M."""
    name = PurePosixPath(path).name
    part = split_part(name)
    stem = part.prefix if part else name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
    if stem.lower().endswith("-split"):
        stem = stem[: -len("-split")]
    m = _QUANT_AT_END.search(stem)
    return m["quant"].upper() if m else None


def is_model_gguf(path: str) -> bool:
    """A GGUF holding a language model, not a vision projector or an importance matrix."""
    name = PurePosixPath(path).name.lower()
    return name.endswith(".gguf") and not name.startswith(("mmproj", "imatrix")) and "mmproj" not in name
