"""What the OpenAI routes share: the common body fields, sampling, usage and logprobs JSON."""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from app.server.fields import Strict
from app.server.generation import Generation
from app.server.sampling import make_sampling
from engines.types import SamplingParams, TokenLogprob

StopField = str | list[str] | None


class StreamOptions(Strict):
    WHERE: ClassVar[str] = "stream_options"
    include_usage: bool = False


class OpenAICommon(Strict):
    model: str = Field("", max_length=512)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, ge=0)
    n: int | None = Field(None, ge=1, le=1, description="only 1 is supported")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: StopField = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    ttl: float | None = Field(None, description="LM Studio: seconds the model stays loaded when idle")


def sampling_of(body: OpenAICommon, max_tokens: int | None) -> SamplingParams:
    return make_sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                         min_p=body.min_p, repeat_penalty=body.repeat_penalty, seed=body.seed, stop=body.stop,
                         presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty)


def usage_json(gen: Generation) -> dict:
    usage = gen.usage()
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def _entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def logprobs_json(items: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> dict:
    """Chat logprobs: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    return {"content": [{**_entry(lp.token, lp.logprob), "top_logprobs": [_entry(t, v) for t, v in lp.top]}
                        for lp in items]}


def legacy_logprobs_json(items: list[TokenLogprob], offset: int = 0) -> dict:
    """/v1/completions logprobs: parallel lists, top_logprobs as {token: logprob} maps."""
    offsets, at = [], offset
    for lp in items:
        offsets.append(at)
        at += len(lp.token)
    return {"tokens": [lp.token for lp in items], "token_logprobs": [lp.logprob for lp in items],
            "top_logprobs": [dict(lp.top) for lp in items], "text_offset": offsets}
