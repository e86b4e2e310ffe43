"""What every route needs, gathered once by the app factory and kept on app.state.ctx."""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request

from app.models.manager import ModelManager
from app.models.broker_link import BrokerLink
from app.models.events import EventHub
from app.server.metrics import Metrics
from app.settings import Settings

VERSION = "0.1.0"
# What /api/version reports: clients gate features on Ollama's version, so we name one
# whose API we implement; our own version is given alongside.
OLLAMA_COMPAT_VERSION = "0.12.6"


@dataclass
class ServerContext:
    settings: Settings
    manager: ModelManager
    metrics: Metrics
    hub: EventHub
    broker: BrokerLink
    token: str
    # Whether models run on a CUDA GPU: the daemon's kvcached backend decided it (False
    # until it has opened). Routing shown to users asks this, as the engine factory does.
    on_cuda: Callable[[], bool] = lambda: False
    started_at: float = field(default_factory=time.time)
    pid: int = field(default_factory=os.getpid)

    @property
    def backend(self) -> str:
        """The broker's monitor ("host", "nvml"...), "none" until (or unless) it runs."""
        return self.broker.backend

    @property
    def endpoint_url(self) -> str:
        return self.settings.endpoint_url


def ctx_of(request: Request) -> ServerContext:
    return request.app.state.ctx
