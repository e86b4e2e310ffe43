"""llama.cpp built with CUDA on the GPU machine, as the peer of benchmarks/quant_decode.py.

The GPU machine has nvcc and CMake but no network: the sources travel as
`.gpu/llama.cpp-src.tar.xz` (scripts/fetch_llama_src.sh: the llama.cpp that
llama-cpp-python 0.3.36 vendors). `start_build` extracts and builds
llama-bench, llama-quantize and llama-batched-bench for sm_90 only in the
background (the shapes are written meanwhile); a finished build under
build/quant/ is reused, and so is a prebuilt bin/ carried in .gpu/ from an
earlier machine (`llama_prebuilt`). `llama_bench` and `batched_bench` run them on a file
with every layer on the GPU and flash attention on, and parse their output.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import llama_prebuilt

log = logging.getLogger("benchmarks.llama_peer")
TARGETS = ("llama-bench", "llama-quantize", "llama-batched-bench", "llama-completion")
CMAKE_FLAGS = ("-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90", "-DCMAKE_BUILD_TYPE=Release",
               "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF")


@dataclass
class Build:
    work: Path
    source_tar: Path | None = None
    process: subprocess.Popen | None = None
    started: float = field(default_factory=time.perf_counter)
    seconds: float | None = None
    cached: bool = False

    @property
    def bin_dir(self) -> Path:
        return self.work / "llama.cpp-build" / "bin"

    def binary(self, name: str) -> str:
        return str(self.bin_dir / name)

    @property
    def has_tools(self) -> bool:
        """Every tool the benchmarks run is in bin/ (built here or restored from a prebuilt)."""
        return all((self.bin_dir / t).exists() for t in TARGETS)

    def wait(self, timeout_s: float) -> bool:
        """Whether the build is done and its binaries exist (logs the outcome once)."""
        if self.process is not None and self.seconds is None:
            try:
                self.process.wait(timeout=max(1.0, timeout_s))
            except subprocess.TimeoutExpired:
                log.error("llama.cpp build still running after %.0f s", time.perf_counter() - self.started)
                return False
            self.seconds = time.perf_counter() - self.started
            log.info("llama.cpp build: rc=%s in %.0f s (log %s)", self.process.returncode, self.seconds,
                     self.work / "build.log")
            self._keep_for_next_machine()
        return self.has_tools

    def _keep_for_next_machine(self) -> None:
        """A fresh build's bin/ goes back with the results (llama_prebuilt says how it returns)."""
        dest = os.environ.get("DEVICE_OUT") or os.environ.get("OUT")
        if dest and self.source_tar is not None and self.has_tools:
            # xz of bin/ takes tens of seconds: off the benchmark's path, on a thread the
            # interpreter waits for at exit (lzma lets go of the GIL while it compresses)
            threading.Thread(target=self._pack, args=(Path(dest),), name="llama-pack").start()

    def _pack(self, dest: Path) -> None:
        try:
            llama_prebuilt.pack(self.bin_dir, self.source_tar, dest)
        except OSError:
            log.exception("packing llama.cpp's bin/ failed (the benchmark goes on)")

    def log_tail(self) -> str:
        path = self.work / "build.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def start_build(source_tar: Path, work: Path, jobs: int = 16) -> Build:
    """Extract and build in the background; a build already there is reused."""
    work.mkdir(parents=True, exist_ok=True)
    build = Build(work, source_tar)
    if not source_tar.exists():
        raise FileNotFoundError(f"{source_tar} is missing: run scripts/fetch_llama_src.sh here and carry .gpu")
    if build.has_tools or _restored_and_runs(source_tar, build):
        build.cached, build.seconds = True, 0.0
        log.info("llama.cpp build: reused %s", build.bin_dir)
        return build
    src, out = work / "llama.cpp", work / "llama.cpp-build"
    script = (f"set -e; rm -rf {src}; tar xJf {source_tar} -C {work}; "
              f"cmake -S {src} -B {out} {' '.join(CMAKE_FLAGS)}; "
              f"cmake --build {out} -j{jobs} --target {' '.join(TARGETS)}")
    log.info("llama.cpp build started: %s", script)
    with open(work / "build.log", "w") as sink:
        build.process = subprocess.Popen(["bash", "-c", script], stdout=sink, stderr=subprocess.STDOUT,
                                         env={**os.environ, "CUDAARCHS": "90"})
    return build


def _restored_and_runs(source_tar: Path, build: Build) -> bool:
    """A prebuilt bin/ carried in .gpu/ restored, and it starts here; one that does not (built
    on another image) is removed, so the sources are built as before."""
    if not (llama_prebuilt.unpack(source_tar.parent, source_tar, build.bin_dir.parent) and build.has_tools):
        return False
    problem = llama_prebuilt.runs_here(build.bin_dir)
    if problem:
        log.warning("prebuilt llama.cpp does not run here (building instead): %s", problem)
        shutil.rmtree(build.bin_dir, ignore_errors=True)
        return False
    return True


def load_and_first_token_s(binary: str | Path, gguf: Path, runs: int = 3, timeout_s: float = 600) -> dict:
    """llama.cpp's whole process (CUDA init, load, one token) with every layer on the GPU,
    best of `runs`: what Ollama pays when it loads a model again. binary: llama-completion."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        cmd = [str(binary), "-m", str(gguf), "-n", "1", "-ngl", "99", "-p", "Hello", "-no-cnv"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env=llama_prebuilt.tool_env(binary))
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            return {"error": done.stderr[-1500:]}
    return {"best_s": min(times), "all_s": times}


def _run(cmd: list[str], timeout_s: float, with_stderr: bool = False) -> str:
    log.info("running %s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                          env=llama_prebuilt.tool_env(cmd[0]))
    if done.returncode:
        raise RuntimeError(f"{cmd[0]} rc={done.returncode}: {done.stderr[-1500:]}")
    # batched-bench prints its rows through llama.cpp's log, which may go to either stream
    return done.stdout + (done.stderr if with_stderr else "")


def _bench_command(build: Build, path: Path, repetitions: int) -> list[str]:
    """llama-bench on path, every layer on the GPU, flash attention, JSON out."""
    return [build.binary("llama-bench"), "-m", str(path), "-ngl", "99", "-fa", "1", "-r", str(repetitions),
            "-o", "json"]


def llama_bench(build: Build, path: Path, prompts: tuple[int, ...], gen: int, timeout_s: float) -> dict:
    """pp<N> and tg<gen> tok/s (mean of llama-bench's repetitions), -ngl 99 -fa 1."""
    out = _run(_bench_command(build, path, 3) + ["-p", ",".join(map(str, prompts)), "-n", str(gen)], timeout_s)
    result: dict = {}
    for rec in json.loads(out):
        key = f"prefill_{rec['n_prompt']}_tok_s" if rec.get("n_prompt") else "decode_b1_tok_s"
        result[key] = float(rec["avg_ts"])
    return result


def llama_bench_depth(build: Build, path: Path, depths: tuple[int, ...], gen: int, timeout_s: float) -> dict:
    """tg<gen> tok/s after a context of each depth (llama-bench -d), -ngl 99 -fa 1: depth -> tok/s."""
    out = _run(_bench_command(build, path, 2) + ["-p", "0", "-n", str(gen), "-d", ",".join(map(str, depths))],
               timeout_s)
    return depth_rates(out)


def depth_rates(llama_bench_json: str) -> dict[int, float]:
    """llama-bench's JSON records -> {n_depth: mean tok/s} of its generation tests."""
    return {int(rec.get("n_depth", 0)): float(rec["avg_ts"]) for rec in json.loads(llama_bench_json)
            if rec.get("n_gen") and not rec.get("n_prompt")}


def batched_bench(build: Build, path: Path, batches: tuple[int, ...], gen: int, timeout_s: float) -> dict:
    """Total decode tok/s with `b` sequences decoding together (llama-batched-bench's S_TG)."""
    out = _run([build.binary("llama-batched-bench"), "-m", str(path), "-ngl", "99", "-fa", "1",
                "-c", str(max(batches) * (gen + 64)), "-npp", "32", "-ntg", str(gen),
                "-npl", ",".join(map(str, batches)), "--output-format", "jsonl"], timeout_s, with_stderr=True)
    result: dict = {}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            rec = json.loads(line)
            if "pl" in rec and "speed_tg" in rec:
                result[f"decode_b{rec['pl']}_tok_s"] = float(rec["speed_tg"])
    if not result:
        raise RuntimeError(f"llama-batched-bench printed no jsonl rows: {out[-800:]}")
    return result
