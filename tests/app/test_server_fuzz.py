"""Schemathesis over the daemon's own OpenAPI schema, against the live daemon: no input,
however odd, may get a 5xx. Bounded (a few examples per operation) to stay well under 90 s
on a busy CPU; generation lengths are clamped so each example costs a couple of tokens."""
from __future__ import annotations

import collections
import itertools

import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error

MAX_EXAMPLES = 15
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "n_predict")


def _operations(url: str):
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    # An endless event stream has no "response" to check.
    for result in schema.exclude(path="/control/events").get_all_operations():
        yield result.ok()


def _clamp(body: object) -> None:
    """Keep each example cheap: at most 2 generated tokens, whatever the fuzzer picked."""
    if not isinstance(body, dict):
        return
    for key in TOKEN_FIELDS:
        if not isinstance(body.get(key), int) or body[key] < 0 or body[key] > 2:
            body[key] = 2
    options = body.get("options")
    if isinstance(options, dict):
        options["num_predict"] = 2
    elif "options" not in body:
        body["options"] = {"num_predict": 2}


def test_no_input_gets_a_5xx(live_server) -> None:
    # schemathesis' pytest plugin does not load under this pytest, so each operation's
    # strategy is driven by hypothesis directly; the check is schemathesis' own.
    operations = list(_operations(live_server.url))
    assert len(operations) > 20
    statuses: collections.Counter = collections.Counter()

    for operation, mode in itertools.product(operations, GenerationMode):
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case) -> None:
            _clamp(case.body)
            response = case.call_and_validate(base_url=live_server.url, headers=live_server.auth,
                                              checks=[not_a_server_error])
            statuses[response.status_code] += 1

        try:
            run()
        except Unsatisfiable:  # no invalid input exists for an operation without parameters
            assert mode is GenerationMode.NEGATIVE, operation.label
    # Both valid and invalid inputs were sent, and answered.
    assert any(200 <= s < 300 for s in statuses) and any(400 <= s < 500 for s in statuses), statuses
