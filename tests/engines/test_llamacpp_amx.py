"""The AMX workaround: llama-cpp-python 0.3.36 built from source segfaults inside decode
on CPUs with AMX unless the model parameter use_extra_bufts is off.

Each check runs llama.cpp in a subprocess, so a crash fails the test instead of
killing pytest. On an AMX CPU the decode test crashes without the workaround;
on any CPU the loader test fails without it, because llama.cpp then weighs the
extra (repacked) buffer types for the weights and says so in its log.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engines.config import EngineConfig
from engines.llamacpp import options
from llamacpp_support import default_gguf

REPO = Path(__file__).resolve().parents[2]
# Buffer types llama.cpp's CPU backend offers as "extra" (weight repacking, AMX tiles).
EXTRA_BUFFER_TYPES = ("CPU_REPACK", "AMX")

DECODE = """
import sys
from engines.config import EngineConfig
from engines.llamacpp.engine import LlamaCppEngine
from engines.registry import ModelRegistry
from engines.types import GenerateRequest, RequestKind, SamplingParams
info = ModelRegistry(EngineConfig(scan_ollama=False, scan_lmstudio=False, scan_hf_cache=False,
                                  models_dir="/nonexistent")).get("")
engine = LlamaCppEngine(info, EngineConfig(llama_n_ctx=256, llama_n_threads=1))
request = GenerateRequest(kind=RequestKind.COMPLETION, prompt="The capital of France is" * 8,
                          sampling=SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
chunks = list(engine.generate(request))
print("GENERATED", chunks[-1].usage.completion_tokens)
"""

LOAD_AND_LOG = """
import logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(message)s")
from llama_cpp import _internals as internals
from engines.config import EngineConfig
from engines.llamacpp import options
from engines.llamacpp.native import route_native_logs
route_native_logs()
params = options.model_params(EngineConfig()).params
if sys.argv[2] == "extra-on":   # the control run: what loading looks like without the workaround
    params.use_extra_bufts = True
internals.LlamaModel(path_model=sys.argv[1], params=params, verbose=True)
print("LOADED")
"""


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)


def _crash_message(proc: subprocess.CompletedProcess) -> str:
    if proc.returncode < 0:
        return f"llama.cpp crashed with {signal.Signals(-proc.returncode).name}: is use_extra_bufts still off?"
    return f"exit {proc.returncode}: {proc.stderr[-2000:]}"


def test_the_engine_decodes_in_a_subprocess_without_crashing() -> None:
    default_gguf()
    proc = _run(DECODE)
    assert proc.returncode == 0, _crash_message(proc)
    assert "GENERATED 4" in proc.stdout


def test_use_extra_bufts_reaches_the_llama_cpp_loader() -> None:
    path = str(default_gguf())
    ours = _run(LOAD_AND_LOG, path, "ours")
    assert ours.returncode == 0, _crash_message(ours)
    assert "LOADED" in ours.stdout
    assert not any(t in ours.stdout for t in EXTRA_BUFFER_TYPES), \
        "llama.cpp considered extra buffer types: use_extra_bufts did not reach the loader"
    control = _run(LOAD_AND_LOG, path, "extra-on")
    if not any(t in control.stdout + control.stderr for t in EXTRA_BUFFER_TYPES) and control.returncode == 0:
        pytest.skip("this llama.cpp build offers no extra buffer types, so the control run shows nothing")


@pytest.mark.parametrize("n_gpu_layers", [-1, 0, 12])
def test_every_configuration_turns_extra_buffers_off(n_gpu_layers: int) -> None:
    assert options.model_params(EngineConfig(llama_n_gpu_layers=n_gpu_layers)).params.use_extra_bufts is False
