"""What every route shares: settings, the model registry, metrics, stored responses (on `app.state.localllm`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from localllm.server.metrics import Metrics
from localllm.server.registry import ModelRegistry
from localllm.server.responses_store import ResponseStore
from localllm.server.settings import ServerSettings


@dataclass
class ServerState:
    settings: ServerSettings
    registry: ModelRegistry
    metrics: Metrics
    started_at: float = field(default_factory=time.time)
    responses: ResponseStore = field(default_factory=ResponseStore)  # the Responses API's stored replies
