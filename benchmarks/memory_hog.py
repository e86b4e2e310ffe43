"""Another application taking the device's memory: down to a free target, held, let go.

    python -m benchmarks.memory_hog --backend cuda --free-target 150MiB --hold-s 20

It takes memory in chunks until the device's free memory is at or under the
target, keeps taking what frees up (the daemon gives memory back) for
`--hold-s` seconds, then frees everything and exits. It reports on stdout, one
word a line, so a driver can follow it: "HELD <bytes held> <free bytes>" once
it reached the target (or could take no more), "RELEASED <bytes>" at the end.
On the host backend the "device" is RAM (MemAvailable), and `--max-take` caps
what it may take, so it never starves the machine it runs on.
"""
from __future__ import annotations

import argparse
import sys
import time

from benchmarks.video_call import ALLOCATORS, AllocationFailed, parse_size

MiB = 1 << 20
CHUNKS = (256 * MiB, 32 * MiB, 2 * MiB)   # big steps first, then close in on the target
POLL_S = 0.05


def say(*words: object) -> None:
    print(*words, flush=True)


def take_down_to(alloc, target: int, cap: int, held: int) -> int:
    """Allocate until free <= target (or nothing more fits, or cap); returns bytes held."""
    for chunk in CHUNKS:
        while alloc.free_bytes() - chunk >= target and held + chunk <= cap:
            try:
                alloc.allocate(chunk)
            except AllocationFailed:
                break
            held += chunk
    return held


def run(args: argparse.Namespace) -> int:
    alloc = ALLOCATORS[args.backend](args)
    held = take_down_to(alloc, args.free_target, args.max_take, 0)
    say("HELD", held, alloc.free_bytes())
    end = time.monotonic() + args.hold_s
    while time.monotonic() < end:      # what the daemon gives back is taken too
        held = take_down_to(alloc, args.free_target, args.max_take, held)
        time.sleep(POLL_S)
    alloc.release()
    say("RELEASED", held)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=tuple(ALLOCATORS), default="cuda")
    parser.add_argument("--free-target", type=parse_size, default=parse_size("150MiB"))
    parser.add_argument("--hold-s", type=float, default=20.0)
    parser.add_argument("--max-take", type=parse_size, default=parse_size("1024GiB"))
    parser.add_argument("--host-floor", type=parse_size, default=0, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
