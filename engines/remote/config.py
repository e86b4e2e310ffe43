"""One remote server, as the settings file's [remotes.NAME] table describes it."""
from __future__ import annotations

from dataclasses import dataclass

from kvcached.errors import ConfigError

KINDS = ("openai", "ollama")


@dataclass(frozen=True)
class RemoteConfig:
    name: str                       # the table's name, e.g. "cluster"
    url: str                        # base URL: http://gpu-box:8000 (no /v1: the dialect adds it)
    kind: str = "openai"            # "openai" (vLLM, SGLang, llama-server, LM Studio) or "ollama"
    prefix: str = ""                # listed names: prefix + the remote's name; "" means "<name>/"
    api_key: str = ""               # sent as a bearer token; kept in the 0600 settings file
    timeout_s: float = 600.0        # longest wait for the next byte of an answer
    connect_timeout_s: float = 5.0
    list_timeout_s: float = 3.0     # listing must not stall /api/tags when the remote is away
    list_every_s: float = 10.0      # a list older than this is fetched again (in the background)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"remotes.{self.name}.kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"remotes.{self.name}.url: {self.url!r} must start with http:// or https://")

    @property
    def model_prefix(self) -> str:
        return self.prefix or f"{self.name}/"

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
