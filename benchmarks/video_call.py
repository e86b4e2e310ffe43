"""The "video call": another desktop process that grows its device memory, holds it, exits.

Run by benchmarks/desktop_pressure.py as a separate process, as a real video
call, game or renderer is. It takes an untimed baseline (the rest of the
desktop), says READY, waits for GO on stdin, then grows by --grow bytes in
--step pieces. A failed allocation is retried every --retry-ms, as real
applications do (Chrome's GPU process, OBS), and each piece records how long
it waited from its first attempt to success: the number the broker is judged
by (<= 250 ms each). It says GROWN, holds for --hold-s, frees everything, says
RELEASED and prints one RESULT line of JSON. With --leave-free, the baseline
is all but that much of the memory free at start.

Backends are siblings in a lookup table: `cuda` (torch.cuda allocations, the
real thing on the GPU) and `host` (anonymous memory touched page by page, for
the CPU smoke run; an allocation "fails" while MemAvailable would fall below
--host-floor, as a device allocation fails when free memory is short).

Usage: python3 benchmarks/video_call.py --backend cuda --grow 8GiB --step 512MiB --hold-s 10
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script, sys.path[0] is benchmarks/, whose http.py would shadow the standard
    # library's (torch imports it): put the repo root there instead.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import json
import mmap
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

MiB = 1 << 20
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": MiB, "mib": MiB, "g": 1 << 30,
          "gib": 1 << 30, "kb": 1000, "mb": 1000**2, "gb": 1000**3}


def parse_size(text: str) -> int:
    """'8GiB', '512MiB', '1048576' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 512MiB or 8GiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


class AllocationFailed(Exception):
    """This attempt found too little free memory; the caller retries."""


class CudaAllocator:
    """Device memory through torch's allocator: an OOM is an ordinary, retried outcome."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        if not torch.cuda.is_available():
            raise SystemExit("video_call: --backend cuda needs a CUDA device")
        torch.cuda.init()
        self.held: list = []

    def allocate(self, nbytes: int) -> None:
        try:
            block = self.torch.empty(nbytes, dtype=self.torch.uint8, device="cuda")
        except self.torch.cuda.OutOfMemoryError as exc:
            # Give the cached (failed) segments back so the next try asks the driver afresh.
            self.torch.cuda.empty_cache()
            raise AllocationFailed(str(exc).splitlines()[0]) from exc
        block.fill_(1)  # touch it, as a frame buffer is written
        self.torch.cuda.synchronize()
        self.held.append(block)

    def free_bytes(self) -> int:
        return int(self.torch.cuda.mem_get_info()[0])

    def release(self) -> None:
        self.held.clear()
        self.torch.cuda.empty_cache()


def mem_available() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class HostAllocator:
    """Anonymous memory, every page written, so RSS really rises (the CPU smoke stand-in)."""

    def __init__(self, floor: int = 0) -> None:
        self.floor = floor
        self.held: list[mmap.mmap] = []
        self._chunk = b"\x01" * MiB

    def allocate(self, nbytes: int) -> None:
        if self.floor and mem_available() - nbytes < self.floor:
            raise AllocationFailed(f"MemAvailable would fall below {self.floor >> 20} MiB")
        try:
            block = mmap.mmap(-1, nbytes)
        except OSError as exc:
            raise AllocationFailed(str(exc)) from exc
        for _ in range(nbytes // MiB):
            block.write(self._chunk)
        block.write(self._chunk[: nbytes % MiB])
        self.held.append(block)

    def free_bytes(self) -> int:
        return mem_available()

    def release(self) -> None:
        for block in self.held:
            block.close()
        self.held.clear()


ALLOCATORS: dict[str, Callable[[argparse.Namespace], object]] = {
    "cuda": lambda args: CudaAllocator(),
    "host": lambda args: HostAllocator(args.host_floor),
}


@dataclass
class StepResult:
    nbytes: int
    wait_s: float          # first attempt -> success
    attempts: int
    free_before: int       # free memory (device, or MemAvailable) at the first attempt
    t: float               # time.time() of success


@dataclass
class CallResult:
    backend: str
    baseline_bytes: int
    grow_bytes: int
    step_bytes: int
    steps: list[StepResult] = field(default_factory=list)
    failed_steps: int = 0
    free_at_start: int = 0
    grow_s: float = 0.0
    t_grown: float = 0.0
    t_released: float = 0.0


def allocate_with_retry(alloc, nbytes: int, retry_s: float, give_up_s: float) -> StepResult | None:
    """Try, and on failure retry every retry_s until give_up_s: None if it never succeeded."""
    free_before = alloc.free_bytes()
    start = time.perf_counter()
    attempts = 0
    while True:
        attempts += 1
        try:
            alloc.allocate(nbytes)
            return StepResult(nbytes, time.perf_counter() - start, attempts, free_before, time.time())
        except AllocationFailed:
            if time.perf_counter() - start > give_up_s:
                return None
            time.sleep(retry_s)


def say(word: str) -> None:
    """One protocol line on stdout for the parent benchmark."""
    print(word, flush=True)


def run(args: argparse.Namespace) -> CallResult:
    alloc = ALLOCATORS[args.backend](args)
    if args.leave_free:  # the rest of the desktop: all but leave_free of what is free now
        args.baseline = max(0, alloc.free_bytes() - args.leave_free)
    result = CallResult(args.backend, args.baseline, args.grow, args.step)
    if args.baseline and allocate_with_retry(alloc, args.baseline, args.retry_ms / 1000, args.give_up_s) is None:
        raise SystemExit("video_call: the untimed baseline could not be allocated")
    say("READY")
    if not args.no_wait:
        sys.stdin.readline()  # GO
    result.free_at_start = alloc.free_bytes()
    start = time.perf_counter()
    remaining = args.grow
    while remaining > 0:
        piece = min(args.step, remaining)
        step = allocate_with_retry(alloc, piece, args.retry_ms / 1000, args.give_up_s)
        if step is None:
            result.failed_steps += 1
            break
        result.steps.append(step)
        remaining -= piece
    result.grow_s = time.perf_counter() - start
    result.t_grown = time.time()
    say("GROWN")
    time.sleep(args.hold_s)
    alloc.release()
    result.t_released = time.time()
    say("RELEASED")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=sorted(ALLOCATORS), default="cuda")
    p.add_argument("--grow", type=parse_size, default=parse_size("8GiB"))
    p.add_argument("--step", type=parse_size, default=parse_size("512MiB"))
    p.add_argument("--baseline", type=parse_size, default=0, help="untimed memory taken first")
    p.add_argument("--leave-free", type=parse_size, default=0,
                   help="untimed baseline that leaves this much free (overrides --baseline)")
    p.add_argument("--hold-s", type=float, default=10.0)
    p.add_argument("--retry-ms", type=float, default=2.0)
    p.add_argument("--give-up-s", type=float, default=30.0)
    p.add_argument("--host-floor", type=parse_size, default=0,
                   help="host backend: fail while MemAvailable would fall below this")
    p.add_argument("--no-wait", action="store_true", help="grow at once, without waiting for GO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.step <= 0 or args.grow < 0:
        raise SystemExit("video_call: --step must be > 0 and --grow >= 0")
    result = run(args)
    say("RESULT " + json.dumps(asdict(result)))
    return 0 if result.failed_steps == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
