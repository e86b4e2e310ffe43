"""Every request field of the three dialects, and what this server does with it.

A field is honoured (it changes what the server does), refused (400 naming
it: the server cannot do it, and answering as if it had would be a lie), or
ignored *because the reference server ignores it too* (OpenAI's `user`,
`store`, `metadata`; llama.cpp's `cache_prompt` where we always cache...).
Nothing else is accepted: a body field that is not in this table answers 400
naming it. Request models derive from `Strict`, which enforces that, and
the README's table is printed from `FIELDS` (`python -m app.server.fields`);
tests/app/test_request_fields.py walks it against the live daemon.
"""
from __future__ import annotations

import logging
import threading
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from app.server.errors import BadRequest

log = logging.getLogger(__name__)

H, I, R = "honoured", "ignored", "400"


class Strict(BaseModel):
    """A request body (or part of one) that refuses fields it does not know.
    IGNORED: fields the reference server accepts and ignores; accepted, dropped.
    REFUSED: fields named with the reason they answer 400."""
    model_config = ConfigDict(extra="allow", strict=True)   # "stream": "yes" is refused, not coerced
    WHERE: ClassVar[str] = "body"
    IGNORED: ClassVar[frozenset[str]] = frozenset()
    REFUSED: ClassVar[dict[str, str]] = {}

    @model_validator(mode="after")
    def _refuse_unknown(self) -> Strict:
        for name in (self.model_extra or {}):
            if name in self.IGNORED:
                continue
            why = self.REFUSED.get(name, "not supported by this server")
            raise BadRequest(f"{self.WHERE}.{name}: {why}")
        return self


# --- the table: endpoint -> field -> (status, note) --------------------------------------
_OPENAI_COMMON = {
    "model": (H, "the model to serve (the default model when empty)"),
    "temperature": (H, ""), "top_p": (H, ""), "seed": (H, ""), "stop": (H, "up to 16 strings"),
    "presence_penalty": (H, ""), "frequency_penalty": (H, ""),
    "stream": (H, ""), "stream_options": (H, "include_usage"),
    "n": (H, "1 only; more answers 400"),
    "logprobs": (H, "the sampled token's log-probability (llama.cpp n_probs)"),
    "top_k": (H, "llama.cpp's extension"), "min_p": (H, "llama.cpp's extension"),
    "repeat_penalty": (H, "llama.cpp's extension"),
    "user": (I, "OpenAI's abuse-monitoring id; llama.cpp ignores it"),
    "logit_bias": (R, "not supported"),
    "cache_prompt": (I, "llama.cpp's switch; prompts are always cached here"),
}
FIELDS: dict[str, dict[str, tuple[str, str]]] = {
    "POST /v1/chat/completions": {
        **_OPENAI_COMMON,
        "messages": (H, "roles system/developer/user/assistant/tool; tool_calls; text parts"),
        "max_tokens": (H, ""), "max_completion_tokens": (H, "wins over max_tokens"),
        "top_logprobs": (H, "0-20 alternatives per token"),
        "tools": (H, "rendered by the model's chat template"),
        "tool_choice": (H, "none / auto / required / named: required and named are constrained to the schema"),
        "parallel_tool_calls": (H, "false keeps the first call"),
        "response_format": (H, "text / json_object / json_schema: constrained decoding"),
        "reasoning_effort": (H, "turns thinking on at that level where the template thinks"),
        "chat_template_kwargs": (H, "llama.cpp's: enable_thinking"),
        "store": (I, "OpenAI stores completions; nothing is stored here, as llama.cpp"),
        "metadata": (I, "goes with store"), "service_tier": (I, "one tier here"),
        "prompt_cache_key": (I, "prompts are always cached"), "safety_identifier": (I, "as user"),
        "modalities": (R, "text only"), "audio": (R, "text only"), "prediction": (R, "not supported"),
        "web_search_options": (R, "no web search"), "functions": (R, "deprecated: send tools"),
        "function_call": (R, "deprecated: send tool_choice"), "verbosity": (R, "not supported"),
    },
    "POST /v1/completions": {
        **_OPENAI_COMMON,
        "prompt": (H, "a string, one string in a list, or token ids"),
        "suffix": (H, "fill-in-the-middle"), "max_tokens": (H, ""), "echo": (H, ""),
        "best_of": (R, "1 only"),
    },
    "POST /v1/embeddings": {
        "model": (H, ""), "input": (H, "strings or token ids"), "encoding_format": (H, "float / base64"),
        "dimensions": (H, "Matryoshka truncation, renormalized"), "user": (I, "as chat"),
    },
    "POST /api/chat": {
        "model": (H, ""), "messages": (H, "role, content, images (400: text only), tool_calls, tool_name, thinking"),
        "tools": (H, ""), "format": (H, "\"json\" or a JSON schema: constrained decoding"),
        "options": (H, "see the options table"), "stream": (H, ""), "keep_alive": (H, ""),
        "think": (H, "true/false or low/medium/high; 400 where the model does not think"),
        "truncate": (H, "false: a prompt over num_ctx answers 400 instead of being cut"),
        "shift": (I, "Ollama's context shift; generation stops at the context here"),
        "logprobs": (H, ""), "top_logprobs": (H, ""),
    },
    "POST /api/generate": {
        "model": (H, ""), "prompt": (H, ""), "suffix": (H, "fill-in-the-middle"), "system": (H, ""),
        "template": (R, "the model's own template is used"), "context": (R, "send messages to /api/chat instead"),
        "raw": (H, ""), "format": (H, "as /api/chat"), "options": (H, ""), "stream": (H, ""),
        "keep_alive": (H, ""), "images": (R, "text only"), "think": (H, "as /api/chat"),
        "truncate": (H, "as /api/chat"), "shift": (I, "as /api/chat"), "logprobs": (H, ""), "top_logprobs": (H, ""),
    },
    "POST /api/embed": {
        "model": (H, ""), "input": (H, ""), "truncate": (H, "true cuts a text to the context, false answers 400"),
        "options": (H, ""), "keep_alive": (H, ""), "dimensions": (H, "truncation, renormalized"),
    },
    "POST /completion": {
        "model": (H, "optional"), "prompt": (H, ""), "n_predict": (H, ""), "temperature": (H, ""),
        "top_k": (H, ""), "top_p": (H, ""), "min_p": (H, ""), "seed": (H, ""), "stop": (H, ""),
        "repeat_penalty": (H, ""), "repeat_last_n": (H, ""), "presence_penalty": (H, ""),
        "frequency_penalty": (H, ""), "stream": (H, ""), "ignore_eos": (H, ""),
        "n_probs": (H, "top-n probabilities per token"), "json_schema": (H, "constrained decoding"),
        "grammar": (H, "GBNF, constrained decoding"), "t_max_predict_ms": (H, "generation deadline"),
        "t_max_prompt_ms": (H, "prompt deadline: a prompt not evaluated in time answers empty"),
        "n_indent": (H, "stops a line that comes back to a shallower indent"),
        "cache_prompt": (I, "always cached"),
        "id_slot": (I, "a request takes the free slot holding the longest cached prefix of its prompt"),
        "samplers": (R, "the sampler order is llama.cpp's default"), "logit_bias": (R, "not supported"),
        "mirostat": (R, "not supported"), "typical_p": (R, "not supported"),
    },
}
FIELDS["POST /infill"] = {**FIELDS["POST /completion"], "input_prefix": (H, ""), "input_suffix": (H, ""),
                          "input_extra": (H, "other files, as llama.vscode sends them")}
# LM Studio's own field on its OpenAI routes: how long the model stays loaded.
for _endpoint in ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/embeddings"):
    FIELDS[_endpoint]["ttl"] = (H, "LM Studio's: seconds the model stays loaded (keep_alive)")

# Ollama's documented options: applied, or named in one warning per model (as Ollama
# itself warns about options it does not know and goes on).
OLLAMA_OPTIONS: dict[str, tuple[str, str]] = {
    "num_ctx": (H, "the context this request may use; above the served one it grows (llama.cpp engine)"),
    "num_predict": (H, ""), "temperature": (H, ""), "top_k": (H, ""), "top_p": (H, ""), "min_p": (H, ""),
    "seed": (H, ""), "stop": (H, ""), "repeat_penalty": (H, ""), "repeat_last_n": (H, ""),
    "presence_penalty": (H, ""), "frequency_penalty": (H, ""),
    **{k: (I, "warned once per model: not applied") for k in (
        "num_keep", "typical_p", "penalize_newline", "numa", "num_batch", "num_gpu", "main_gpu",
        "use_mmap", "use_mlock", "num_thread", "mirostat", "mirostat_tau", "mirostat_eta", "tfs_z",
        "low_vram", "f16_kv", "vocab_only", "logits_all", "embedding_only")},
}

_warned: set[tuple[str, frozenset[str]]] = set()
_warned_lock = threading.Lock()


def warn_unapplied_options(model: str, names: set[str]) -> None:
    """One warning per model and set of names: Ollama options that are not applied here."""
    if not names:
        return
    key = (model, frozenset(names))
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning("%s: Ollama options not applied by this server: %s", model, ", ".join(sorted(names)))


def markdown_table() -> str:
    lines = ["| endpoint | field | status | note |", "|---|---|---|---|"]
    for endpoint, fields in FIELDS.items():
        for name, (status, note) in fields.items():
            lines.append(f"| `{endpoint}` | `{name}` | {status} | {note} |")
    for name, (status, note) in OLLAMA_OPTIONS.items():
        lines.append(f"| `POST /api/chat`, `/api/generate`, `/api/embed` | `options.{name}` | "
                     f"{'honoured' if status == H else 'warned, not applied (Ollama warns too)'} | {note} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
