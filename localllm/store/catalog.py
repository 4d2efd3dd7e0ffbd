"""The curated catalog: short names like `qwen2.5:7b` for real Hugging Face repositories.

The source of truth is `models/catalog.toml` at the top of the project. It
ships inside the package as `localllm/store/catalog.toml` (a link to that file
in the source tree, a copy in a built wheel), so `importlib.resources` finds it
in a checkout, an editable install and an installed wheel alike. A checkout
whose file system dropped the link falls back to the source tree path.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

REQUIRED_FIELDS: dict[str, type] = {
    "name": str,
    "description": str,
    "gguf_repo": str,
    "source_repo": str,
    "parameters": str,
    "context_length": int,
    "license": str,
    "default_quant": str,
    "heads": int,
    "kv_heads": int,
}
OPTIONAL_FIELDS = ("aliases", "kind", "reasoning", "experts")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*(:[a-z0-9][a-z0-9._-]*)?$")
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_PARAMS = re.compile(r"^(\d+(?:\.\d+)?)([MB])$")
KINDS = ("chat", "embedding")  # what a model is for: generating text, or embedding it


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    gguf_repo: str
    source_repo: str
    parameters: str  # as the model card writes it: "7.61B"
    context_length: int
    license: str
    default_quant: str
    heads: int
    kv_heads: int
    aliases: tuple[str, ...] = ()
    kind: str = "chat"
    reasoning: bool = False  # thinks before answering (<think>...</think> or its own channels)
    experts: int = 0  # experts per mixture-of-experts layer; 0: a dense model

    @property
    def is_embedding(self) -> bool:
        return self.kind == "embedding"

    @property
    def is_moe(self) -> bool:
        """A mixture of experts: llama.cpp runs it, the native engine does not."""
        return self.experts > 0

    @property
    def parameter_count(self) -> int:
        number, unit = _PARAMS.match(self.parameters).groups()  # validated at load
        return round(float(number) * (1e9 if unit == "B" else 1e6))


@dataclass
class Catalog:
    entries: list[CatalogEntry]
    _by_name: dict[str, CatalogEntry] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for entry in self.entries:
            for key in (entry.name, *entry.aliases):
                if key.lower() in self._by_name:
                    raise ValueError(f"catalog: name '{key}' is used twice")
                self._by_name[key.lower()] = entry

    def get(self, name: str) -> CatalogEntry | None:
        """The entry for a name or alias (case does not matter)."""
        return self._by_name.get(name.lower())

    def lookup(self, text: str) -> tuple[CatalogEntry, str | None] | None:
        """`NAME` or `NAME:QUANT` -> (entry, quant or None); None when no entry matches.

        Names contain a colon themselves (`qwen2.5:7b`), so the whole text is
        tried first and only then the part before the last colon.
        """
        entry = self.get(text)
        if entry is not None:
            return entry, None
        head, sep, quant = text.rpartition(":")
        if sep and quant:
            entry = self.get(head)
            if entry is not None:
                return entry, quant
        return None


def catalog_text() -> str:
    """The catalog file's text, from the package data or the source tree."""
    packaged = resources.files("localllm.store").joinpath("catalog.toml")
    try:
        text = packaged.read_text(encoding="utf-8")
        if text.lstrip().startswith(("#", "[")):  # a link checked out as a plain file holds a path
            return text
    except OSError:
        pass  # a checkout without the link: read the source tree directly
    source = Path(__file__).resolve().parents[2] / "models" / "catalog.toml"
    return source.read_text(encoding="utf-8")


def parse_catalog(text: str) -> Catalog:
    """Parse and check a catalog; a ValueError names the entry and field at fault."""
    data = tomllib.loads(text)
    entries = []
    for i, raw in enumerate(data.get("model", [])):
        label = raw.get("name", f"entry {i + 1}")
        for key, kind in REQUIRED_FIELDS.items():
            value = raw.get(key)
            if not isinstance(value, kind) or isinstance(value, bool) or value in ("", 0):
                raise ValueError(f"catalog: {label} needs {key} ({kind.__name__})")
        aliases = raw.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
            raise ValueError(f"catalog: {label}: aliases must be a list of names")
        kind = raw.get("kind", "chat")
        if kind not in KINDS:
            raise ValueError(f"catalog: {label}: kind must be one of {', '.join(KINDS)}")
        reasoning = raw.get("reasoning", False)
        if not isinstance(reasoning, bool):
            raise ValueError(f"catalog: {label}: reasoning must be true or false")
        experts = raw.get("experts", 0)
        if not isinstance(experts, int) or isinstance(experts, bool) or experts < 0 or experts == 1:
            raise ValueError(f"catalog: {label}: experts must be 0 (dense) or the expert count of a mixture of experts")
        unknown = set(raw) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS)
        if unknown:
            raise ValueError(f"catalog: {label}: unknown field(s) {', '.join(sorted(unknown))}")
        for name in (raw["name"], *aliases):
            if not _NAME.match(name):
                raise ValueError(f"catalog: '{name}' is not a valid model name (lower case, FAMILY[:SIZE])")
        for key in ("gguf_repo", "source_repo"):
            if not _REPO.match(raw[key]):
                raise ValueError(f"catalog: {label}: {key} '{raw[key]}' is not ORG/REPO")
        if not _PARAMS.match(raw["parameters"]):
            raise ValueError(f"catalog: {label}: parameters '{raw['parameters']}' is not like 7.61B or 494M")
        entries.append(
            CatalogEntry(
                **{k: raw[k] for k in REQUIRED_FIELDS},
                aliases=tuple(aliases), kind=kind, reasoning=reasoning, experts=experts,
            )
        )
    if not entries:
        raise ValueError("catalog: no [[model]] entries")
    return Catalog(entries)


@lru_cache(maxsize=1)
def default_catalog() -> Catalog:
    return parse_catalog(catalog_text())


def catalog_reasoning(name: str) -> bool | None:
    """Whether the catalog entry a model was installed as (`NAME` or `NAME:QUANT`) reasons; None when
    the name is no catalog entry's (a file, an hf: reference): then only its template can tell."""
    try:
        found = default_catalog().lookup(name)
    except (OSError, ValueError):
        return None
    return found[0].reasoning if found is not None else None
