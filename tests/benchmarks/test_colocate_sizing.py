"""benchmarks/colocate.py's sizing: the two configurations differ only in memory, and
the budget check reads what the broker counted."""
from __future__ import annotations

from benchmarks import colocate

MODELS = ["m-a", "m-b", "m-c"]


def smoke_args():
    args = colocate.build_parser().parse_args(["--smoke"])
    colocate.apply_smoke(args)
    return args


def test_static_and_elastic_run_the_same_slots_and_only_static_caps_each_model():
    args = smoke_args()
    size = colocate.sizing(args)
    assert size["budget_bytes"] == 3 * (size["weights_bytes"] + size["kv_third_bytes"])
    assert size["kv_third_bytes"] < size["peak_need_bytes"]           # a third cannot hold a peak
    elastic = colocate.daemon_settings("elastic", args, MODELS, size, None)
    static = colocate.daemon_settings("static", args, MODELS, size, None)
    assert elastic["num_slots"] == static["num_slots"] == args.peak_users
    assert elastic["budget_bytes"] == static["budget_bytes"] == size["budget_bytes"]
    assert all("max_bytes" not in m for m in elastic["models"].values())
    assert {m["max_bytes"] for m in static["models"].values()} == {size["weights_bytes"] + size["kv_third_bytes"]}
    assert {m["engine"] for m in static["models"].values()} == {"torch"}   # its admission enforces caps


def test_budget_check_uses_what_the_broker_counted():
    size = {"budget_bytes": 100}
    under = {"models": {"a": {"weights": 40, "kv_held": 20}}, "broker_held": {"a": 90}}
    over = {"models": {"a": {"weights": 40, "kv_held": 20}}, "broker_held": {"a": 101}}
    assert colocate.budget_check([under], size)["within_budget"]
    check = colocate.budget_check([under, over], size)
    assert not check["within_budget"] and check["max_held_bytes"] == 101 and check["max_mapped_bytes"] == 60
    assert not colocate.budget_check([{"models": {}}], size)["within_budget"]   # nothing counted: no verdict


def test_default_sizing_is_the_committed_h100_run():
    """The defaults reproduce benchmarks/results/colocate.json: llama-3.2-1b, a static third
    of 0.4 peaks (the whole KV 1.2 peaks), users 0 -> 32 -> 0."""
    args = colocate.build_parser().parse_args([])
    args.model_config = args.model_config or "llama-3.2-1b"
    size = colocate.sizing(args)
    assert (args.base_users, args.peak_users, args.rise_s, args.hold_s, args.fall_s) == (0, 32, 3.0, 15.0, 3.0)
    assert size["peak_need_bytes"] == 32 * 512 * 32768 and size["kv_third_bytes"] == 216006656
