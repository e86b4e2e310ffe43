"""What engine_compare measures the llama.cpp engine against, each as a `Subject`.

- `RawLlama`: llama-cpp-python itself (`Llama.generate`, greedy) on the same GGUF at a
  given thread count: llama.cpp's own speed with nothing of Ebbtide in the way. It runs
  in a process of its own (`RawLlamaProcess`), as the daemon does: two llama.cpp
  contexts in one process slow each other's multi-threaded decode (seen here, 2 cores:
  raw 2-thread decode 88-90 tok/s alone, 30-32 with a second, idle, context loaded in
  the same process), which would measure the process, not llama.cpp.
- `InProcess`: Ebbtide's LlamaCppEngine called directly (no HTTP).
- `OverHttp`: the real daemon (`python -m app.cli serve`) on loopback, llama.cpp's
  `/completion` streamed: what an editor gets.
- `HttpStreams`: N concurrent streams to that daemon, total tokens per second.

Every subject answers `prefill(run)` (prompt tok/s and time to the first token of a
prompt of about `prompt_tokens` tokens, max one token generated) and `decode(run)`
(tok/s after the first of `decode_tokens` greedy tokens). Each run's text starts with
its run number, so no subject finds the prompt already cached.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx

FILLER = "The quick brown fox jumps over the lazy dog while the cat watches from the window. "


@dataclass
class Workload:
    prompt_words: int        # FILLER repeats in a prefill prompt
    decode_tokens: int

    def prefill_prompt(self, run: int) -> str:
        return f"{run}. " + FILLER * self.prompt_words

    @staticmethod
    def decode_prompt(run: int, stream: int = 0) -> str:
        return f"Story {run}.{stream}: once upon a time"


class RawLlama:
    def __init__(self, model_path: str, threads: int, n_ctx: int, n_batch: int) -> None:
        from engines.llamacpp.native import plain_llama

        self.name = f"raw llama-cpp-python, {threads} thread{'s' if threads > 1 else ''}"
        self.threads = threads
        self.llm = plain_llama(model_path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                               n_batch=n_batch, n_ubatch=n_batch, verbose=False)

    def _tokens(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=True)

    def prefill(self, work: Workload, run: int) -> tuple[float, float]:
        tokens = self._tokens(work.prefill_prompt(run))
        started = time.perf_counter()
        generator = self.llm.generate(tokens, temp=0.0)
        next(generator)
        elapsed = time.perf_counter() - started
        generator.close()
        return len(tokens) / elapsed, elapsed * 1e3

    def decode(self, work: Workload, run: int) -> float:
        first = last = 0.0
        for i, _ in enumerate(self.llm.generate(self._tokens(work.decode_prompt(run)), temp=0.0)):
            last = time.perf_counter()
            if i == 0:
                first = last
            if i + 1 >= work.decode_tokens:
                break
        return (work.decode_tokens - 1) / (last - first)

    def close(self) -> None:
        self.llm.close()


def _serve_raw(connection, model_path: str, threads: int, n_ctx: int, n_batch: int) -> None:
    """The child process of RawLlamaProcess: one RawLlama, answering (method, work, run)."""
    raw = RawLlama(model_path, threads, n_ctx, n_batch)
    connection.send(raw.name)
    while (message := connection.recv()) is not None:
        method, work, run = message
        connection.send(getattr(raw, method)(work, run))
    raw.close()


class RawLlamaProcess:
    """RawLlama in a spawned child process (why: the module doc), driven over a pipe."""

    def __init__(self, model_path: str, threads: int, n_ctx: int, n_batch: int) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_serve_raw, args=(child, model_path, threads, n_ctx, n_batch),
                                        daemon=True)
        self._process.start()
        self.threads = threads
        self.name = self._connection.recv()

    def prefill(self, work: Workload, run: int) -> tuple[float, float]:
        self._connection.send(("prefill", work, run))
        return self._connection.recv()

    def decode(self, work: Workload, run: int) -> float:
        self._connection.send(("decode", work, run))
        return self._connection.recv()

    def close(self) -> None:
        self._connection.send(None)
        self._process.join(timeout=30)


class InProcess:
    def __init__(self, engine, threads: int) -> None:
        self.name = f"Ebbtide engine in-process, {threads} thread{'s' if threads > 1 else ''}"
        self.threads = threads
        self.engine = engine

    def _run(self, prompt: str, max_tokens: int) -> tuple[float, float, float, int, int]:
        from engines.types import GenerateRequest, RequestKind, SamplingParams

        request = GenerateRequest(kind=RequestKind.COMPLETION, prompt=prompt,
                                  sampling=SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        started = time.perf_counter()
        first = last = None
        for chunk in self.engine.generate(request):
            first = first or time.perf_counter()
            last = chunk
        return started, first, time.perf_counter(), last.usage.prompt_tokens, last.usage.completion_tokens

    def prefill(self, work: Workload, run: int) -> tuple[float, float]:
        started, first, _, prompt_tokens, _ = self._run(work.prefill_prompt(run), 1)
        return prompt_tokens / (first - started), (first - started) * 1e3

    def decode(self, work: Workload, run: int) -> float:
        _, first, end, _, generated = self._run(work.decode_prompt(run), work.decode_tokens)
        return (generated - 1) / (end - first)

    def close(self) -> None:
        self.engine.unload()


async def stream_completion(client: httpx.AsyncClient, prompt: str, n_predict: int) -> tuple[float, float, float, dict]:
    """(sent, first token, end) client-side, and the final chunk, of one streamed /completion."""
    body = {"prompt": prompt, "n_predict": n_predict, "temperature": 0, "ignore_eos": True, "stream": True}
    sent = time.perf_counter()
    first, final = None, {}
    async with client.stream("POST", "/completion", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = json.loads(line[6:])
            if data.get("stop"):
                final = data
            elif data.get("content"):
                first = first or time.perf_counter()
    end = time.perf_counter()
    return sent, first or end, end, final


class OverHttp:
    def __init__(self, base_url: str, threads: int) -> None:
        self.name = f"Ebbtide over HTTP, {threads} thread{'s' if threads > 1 else ''}"
        self.threads = threads
        self.base_url = base_url

    def _one(self, prompt: str, n_predict: int) -> tuple[float, float, float, dict]:
        async def go():
            async with httpx.AsyncClient(base_url=self.base_url, timeout=600, trust_env=False) as client:
                return await stream_completion(client, prompt, n_predict)
        return asyncio.run(go())

    def prefill(self, work: Workload, run: int) -> tuple[float, float]:
        sent, first, _, final = self._one(work.prefill_prompt(run), 1)
        return final["tokens_evaluated"] / (first - sent), (first - sent) * 1e3

    def decode(self, work: Workload, run: int) -> float:
        _, first, end, final = self._one(work.decode_prompt(run), work.decode_tokens)
        return (final["tokens_predicted"] - 1) / (end - first)

    def close(self) -> None:
        pass


def concurrent_streams(base_url: str, num_streams: int, tokens: int, run: int) -> dict:
    """num_streams streamed requests at once: total generated tok/s over the wall time, and
    whether every first token came before the first end (they overlapped)."""
    async def go():
        limits = httpx.Limits(max_connections=num_streams)
        async with httpx.AsyncClient(base_url=base_url, timeout=600, trust_env=False, limits=limits) as client:
            return await asyncio.gather(*(stream_completion(client, Workload.decode_prompt(run, i), tokens)
                                          for i in range(num_streams)))
    started = time.perf_counter()
    results = asyncio.run(go())
    wall = time.perf_counter() - started
    generated = sum(r[3]["tokens_predicted"] for r in results)
    return {"total_tok_s": generated / wall, "wall_s": wall, "max_ttft_s": max(r[1] - r[0] for r in results),
            "overlapped": max(r[1] for r in results) < min(r[2] for r in results)}
