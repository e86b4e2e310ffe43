"""What an unload leaves in the daemon, step by step (issue 15): where exhaustion.py's
"after the unload" figure comes from when it is over its 64 MiB.

    PYTHONPATH=. python3 -m benchmarks.daemon_residue [--hold-s 10]

unload_residue.py measures one engine in one process; this one the daemon as the user
runs it (its defaults: weights in pool pages, the decode step compiled, two models,
the broker), over HTTP and NVML (the broker's `ours_bytes`). The steps, each ending
with every model unloaded and the daemon's memory read:
  one      one model: a request, then unload;
  again    the same once more (what a second load of compiled shapes adds);
  two      both models loaded, a request each, then both unloaded;
  pressure one model serving while memory_hog.py holds the device down to 150 MiB free
           (a pause of its weights and KV to the host, a resume after), then unload.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from benchmarks import e2e_common as common
from benchmarks.daemon_proc import running
from benchmarks.exhaustion import Hog, Record, daemon_memory, pool_memory, send, settings_for, unload
from benchmarks.exhaustion import build_parser as exhaustion_parser
from benchmarks.exhaustion import resolve_defaults
from benchmarks.results_io import print_table, write_result

MiB = 1 << 20
REQUEST_TIMEOUT_S = 600.0   # a request that loads (and compiles) its model


def settled_memory(daemon, settle_s: float) -> tuple[int, int]:
    time.sleep(settle_s)      # a few broker samples after the unload
    return daemon_memory(daemon), pool_memory(daemon)


def step_one(daemon, models: list[str]) -> list[Record]:
    record = send(daemon.base_url, models[0], REQUEST_TIMEOUT_S, Record(0, "one", models[0]))
    unload(daemon, models[0])
    return [record]


def step_two(daemon, models: list[str]) -> list[Record]:
    records = [send(daemon.base_url, m, REQUEST_TIMEOUT_S, Record(0, "two", m)) for m in models]
    for model in models:
        unload(daemon, model)
    return records


def step_pressure(daemon, models: list[str], args) -> list[Record]:
    model = models[0]
    records = [send(daemon.base_url, model, REQUEST_TIMEOUT_S, Record(0, "pressure", model))]
    hog = Hog("cuda", args.free_target, args.hold_s, args.max_take)
    try:
        hog.wait_held()
        deadline = time.monotonic() + args.hold_s
        while time.monotonic() < deadline:
            records.append(send(daemon.base_url, model, args.request_timeout_s, Record(0, "pressure", model)))
        hog.wait_released(args.hold_s + 60)
    finally:
        hog.kill()
    records.append(send(daemon.base_url, model, args.request_timeout_s, Record(0, "pressure", model)))
    unload(daemon, model)
    return records


def run(args) -> dict:
    models = common.synthetic_models(args.config, 2)
    steps = {"one": lambda d: step_one(d, models), "again": lambda d: step_one(d, models),
             "two": lambda d: step_two(d, models), "pressure": lambda d: step_pressure(d, models, args)}
    rows = []
    settings = settings_for(args)
    if args.max_context:   # unload_residue.py's engines serve 2,048 tokens; the daemon 8,192 by default
        settings["max_context"] = args.max_context
    with running(settings, name="daemon_residue") as daemon:
        daemon.wait_for_device()
        baseline, _ = settled_memory(daemon, args.settle_s)
        for name, step in steps.items():
            records = step(daemon)
            ours, pool = settled_memory(daemon, args.settle_s)
            rows.append({"step": name, "daemon_bytes": ours, "over_baseline_bytes": ours - baseline,
                         "pool_bytes": pool, "statuses": [r.status for r in records]})
            print(json.dumps(rows[-1]), flush=True)   # a run cut off still tells what it saw
        memory = daemon.control_get("/control/memory")
        log_tail = daemon.log_tail(400)
    return {"models": models, "baseline_daemon_bytes": baseline, "steps": rows,
            "memory_after": memory, "log_tail": log_tail.splitlines()}


def main(argv: list[str] | None = None) -> int:
    common.setup_logging()
    parser = exhaustion_parser()
    parser.set_defaults(hold_s=10.0, settle_s=2.0)
    parser.add_argument("--max-context", type=int, default=0,
                        help="the daemon's max_context (default: its own): the KV's address space "
                             "grows with it, mapped to the zero page where no token is")
    args = resolve_defaults(parser.parse_args(argv))
    result = run(args)
    print_table(["step", "daemon MiB", "over baseline MiB", "pool MiB"],
                [[r["step"], r["daemon_bytes"] // MiB, r["over_baseline_bytes"] // MiB, r["pool_bytes"] // MiB]
                 for r in result["steps"]])
    name = "daemon_residue" + (f"_ctx{args.max_context}" if args.max_context else "")
    print(json.dumps({"written": str(write_result(name, result))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
