"""A model's own parameters (Ollama's Modelfile PARAMETER lines, kept in its manifest) as request defaults.

A model made with /api/create may carry options such as `temperature` or
`num_predict`; an Ollama request's own options win over them, key by key.
"""

from __future__ import annotations

import json
from typing import Any

from localllm.core.errors import LocalLLMError
from localllm.server.registry import ModelRegistry
from localllm.server.schemas import OllamaOptions


async def with_model_parameters(registry: ModelRegistry, model: str, options: OllamaOptions | None) -> OllamaOptions | None:
    """`options` over the parameters the named model was created with (unchanged when it has none)."""
    try:
        resolved = await registry.find(model)
    except LocalLLMError:
        return options  # the request's own lease reports an unknown model
    parameters = resolved.manifest.parameters if resolved.manifest is not None else {}
    if not parameters:
        return options
    given = options.model_dump(exclude_none=True) if options is not None else {}
    return OllamaOptions.model_validate({**parameters, **given})


def parameters_text(parameters: dict[str, Any]) -> str:
    """Parameters the way Ollama's /api/show writes them: one `name value` line each, a line per stop string."""
    lines = []
    for key, value in sorted(parameters.items()):
        for one in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<30} {json.dumps(one) if isinstance(one, str) else one}")
    return "\n".join(lines)
