"""Typed requests and results that every engine takes and returns.

The HTTP layer translates OpenAI, Ollama and llama.cpp JSON into these at the
edge; nothing inside the engines ever sees raw JSON.
"""
from __future__ import annotations

import enum
import threading
import uuid
from dataclasses import dataclass, field


class RequestKind(enum.Enum):
    CHAT = "chat"              # messages rendered through the model's chat template
    COMPLETION = "completion"  # raw prompt text
    INFILL = "infill"          # fill-in-the-middle: prompt is the prefix, suffix the rest


class FinishReason(enum.Enum):
    STOP = "stop"              # end-of-generation token or a stop string
    LENGTH = "length"          # max_tokens or the context ran out
    CANCELLED = "cancelled"    # the client went away


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; temperature 0 means greedy."""
    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_last_n: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # The client set no max_tokens: answer until a stop or the context is full
    # (max_tokens then holds that limit). The torch engine books its KV as it
    # grows instead of the whole context up front (engines/torch/serve/kv_budget.py).
    open_ended: bool = False

    def __post_init__(self) -> None:
        # Values come from clients through the HTTP layer, which validates them
        # first; these are internal invariants.
        assert self.max_tokens >= 0, "max_tokens must be >= 0"
        assert self.temperature >= 0, "temperature must be >= 0"
        assert 0 < self.top_p <= 1, "top_p must be in (0, 1]"
        assert 0 <= self.min_p <= 1, "min_p must be in [0, 1]"

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(frozen=True)
class ChatMessage:
    role: str       # "system" | "user" | "assistant" | "tool"
    content: str
    # Assistant turns that called tools: [{"id", "type": "function", "function": {"name",
    # "arguments": dict}}], arguments parsed as chat templates expect (llama.cpp --jinja too).
    tool_calls: tuple[dict, ...] = ()
    tool_call_id: str = ""     # tool turns: the call answered (OpenAI)
    name: str = ""             # tool turns: the tool's name (Ollama tool_name)
    thinking: str = ""         # assistant turns: the reasoning given back (Ollama message.thinking)

    def template_dict(self) -> dict:
        """The message as chat templates read it: only the keys that are set."""
        out: dict = {"role": self.role, "content": self.content}
        for key in ("tool_calls", "tool_call_id", "name"):
            if getattr(self, key):
                out[key] = list(self.tool_calls) if key == "tool_calls" else getattr(self, key)
        if self.thinking:
            out["reasoning_content"] = self.thinking
        return out


@dataclass(frozen=True)
class Constraint:
    """Constrained decoding: every token sampled keeps the output a prefix of the grammar.
    kind "json_schema": text is a JSON schema (serialized); "gbnf": a llama.cpp GBNF grammar."""
    kind: str
    text: str

    def __post_init__(self) -> None:
        assert self.kind in ("json_schema", "gbnf"), self.kind


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model, and the likeliest alternatives."""
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass
class GenerateRequest:
    kind: RequestKind
    sampling: SamplingParams = field(default_factory=SamplingParams)
    messages: tuple[ChatMessage, ...] = ()   # CHAT
    prompt: str = ""                          # COMPLETION, or the INFILL prefix
    suffix: str = ""                          # INFILL
    extra_context: tuple[str, ...] = ()       # INFILL: other files (llama.cpp input_extra)
    add_generation_prompt: bool = True
    tools: tuple[dict, ...] = ()              # CHAT: OpenAI-shaped tool definitions, for the template
    think: bool | str | None = None           # CHAT: None = the template's default; True/False/"low".."high"
    constraint: Constraint | None = None      # constrained decoding (JSON schema or GBNF)
    top_logprobs: int = -1                    # -1: no logprobs; n >= 0: the token's and n alternatives
    num_ctx: int | None = None                # the context this request may use (Ollama num_ctx)
    deadline_s: float | None = None           # stop generating after this long (llama.vscode t_max_predict_ms)
    prompt_deadline_s: float | None = None    # a prompt not evaluated in this long ends empty (t_max_prompt_ms)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Ask the engine to stop this request and free its sequence at once."""
        self.cancelled.set()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0        # prompt tokens whose KV was reused, not recomputed
    prompt_eval_ns: int = 0
    eval_ns: int = 0
    load_ns: int = 0


@dataclass(frozen=True)
class StreamChunk:
    """One piece of a streamed generation. The last chunk has finish_reason and usage set."""
    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    logprobs: tuple[TokenLogprob, ...] = ()   # one per token in token_ids, where asked for


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: tuple[tuple[float, ...], ...]
    prompt_tokens: int


class ModelState(enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"      # weights in memory, ready (busy or idle: see Engine.busy)
    PAUSED = "paused"      # weights in memory, KV on the host; resumes on next request


@dataclass(frozen=True)
class MemoryReport:
    weights_bytes: int = 0
    kv_held_bytes: int = 0      # mapped KV pages (device or host backend)
    kv_live_bytes: int = 0      # of which hold live tokens
    paused_host_bytes: int = 0  # KV moved to host memory by pause()
    paused_disk_bytes: int = 0  # of it, spilled to disk when the host ran short (relieve_host)
    weights_host_bytes: int = 0  # weights moved to host memory by weights_to_host(), ready at copy speed
    prompt_cache_host_bytes: int = 0  # idle conversations parked in host memory (llama.cpp engine)
    staging_host_bytes: int = 0  # host buffers kept for the KV's and weights' copies (pinned on the GPU)
    on_gpu: bool = False
    # Admission (the broker's budget): KV promised to running and admitted sequences
    # but not mapped yet; the broker counts it as held so no one else is promised it.
    kv_booked_bytes: int = 0
    # Held KV that no running sequence needs (cached prefixes, trimmable pages):
    # what trim + drop_prefixes can give back; None where the engine cannot say.
    kv_cached_bytes: int | None = None

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_held_bytes

    def rung(self, state: "ModelState") -> str:
        """Where the broker's ladder has this model: "loaded", "kv_on_host" (paused),
        "weights_on_host" (paused, its weights too: nothing on the GPU, ready at copy speed),
        or the state itself (unloaded, loading)."""
        if state is ModelState.PAUSED:
            return "weights_on_host" if self.weights_host_bytes else "kv_on_host"
        return state.value


@dataclass(frozen=True)
class LoadProgress:
    """Reported while a model loads, for the CLI's bar and the tray/dashboard."""
    model: str
    fraction: float     # 0..1
    stage: str          # "reading", "dequantizing", "allocating", "compiling", "ready"
