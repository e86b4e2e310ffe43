"""Load shapes and the arithmetic of latency, shared by the end-to-end benchmarks.

Pure (no HTTP, no torch), so it is unit-tested on the CPU in
tests/benchmarks/test_load_gen.py. The HTTP side that sends the requests lives
in benchmarks/stream_client.py.

The load is closed-loop users, as an editor or chat user behaves: each user
sends a request, waits for its answer, thinks for a random (exponential) while,
and sends the next. How many users are active follows a trapezoid per model
(`Ramp`): a base, a rise to a peak, a hold, a fall back. User k of a ramp has
one activation window (`Ramp.window`), so the active count at any time is a
plain count of windows, and a user whose window closes finishes its request in
flight but starts no new one. Closed-loop users make the KV memory a model
needs at its peak a function of the peak user count alone (peak users x KV per
sequence), independent of how fast the GPU decodes, which is what lets the
colocation benchmark size a static split that really binds.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

# Common English words for prompts: unique random sequences per request defeat
# prefix reuse, so every request really prefills its whole prompt.
WORDS = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war "
    "history party result change morning reason research girl guy moment air teacher force "
    "education foot boy age policy music market sense nation plan college interest death "
    "experience effect use class control care field development role effort rate heart drug "
    "show leader light voice wife police mind price report decision son view relationship town "
    "road arm difference value building action model season society tax director position "
    "player record paper space ground form event official matter center couple site project "
    "activity star table need court oil situation cost industry figure street image phone data"
).split()


class LoadShapeError(ValueError):
    """A load shape that cannot be run (negative times, peak below base...)."""


@dataclass(frozen=True)
class Ramp:
    """Active users over time for one model: base -> rise -> peak (hold) -> fall -> base."""
    start_s: float
    rise_s: float
    hold_s: float
    fall_s: float
    base_users: int
    peak_users: int
    end_s: float          # the whole run's end: base users stay until then

    def __post_init__(self) -> None:
        times = {"start_s": self.start_s, "rise_s": self.rise_s, "hold_s": self.hold_s,
                 "fall_s": self.fall_s}
        for name, value in times.items():
            if value < 0:
                raise LoadShapeError(f"{name}={value} must be >= 0")
        if not 0 <= self.base_users <= self.peak_users:
            raise LoadShapeError(f"need 0 <= base_users ({self.base_users}) <= peak_users "
                                 f"({self.peak_users})")
        if self.end_s < self.fall_end_s:
            raise LoadShapeError(f"end_s={self.end_s} is before the ramp ends ({self.fall_end_s})")

    @property
    def peak_start_s(self) -> float:
        return self.start_s + self.rise_s

    @property
    def peak_end_s(self) -> float:
        return self.peak_start_s + self.hold_s

    @property
    def fall_end_s(self) -> float:
        return self.peak_end_s + self.fall_s

    def window(self, user: int) -> tuple[float, float]:
        """[on, off) of user number `user` (0-based). The first base users stay the whole run;
        the others join one by one over the rise and leave in reverse order over the fall."""
        if not 0 <= user < self.peak_users:
            raise LoadShapeError(f"user {user} is outside 0..{self.peak_users - 1}")
        if user < self.base_users:
            return 0.0, self.end_s
        span = self.peak_users - self.base_users
        frac = (user - self.base_users + 1) / span   # this user's share of the climb, (0, 1]
        return self.start_s + self.rise_s * frac, self.peak_end_s + self.fall_s * (1.0 - frac)

    def users_at(self, t: float) -> int:
        """How many users are active at time t (a count of windows, so it matches them exactly)."""
        return sum(1 for u in range(self.peak_users) if _inside(t, self.window(u)))

    def at_peak(self, t: float) -> bool:
        return self.peak_start_s <= t < self.peak_end_s


def _inside(t: float, window: tuple[float, float]) -> bool:
    return window[0] <= t < window[1]


def staggered_ramps(num_models: int, *, base_users: int, peak_users: int, rise_s: float,
                    hold_s: float, fall_s: float, lead_s: float = 0.0,
                    tail_s: float = 0.0) -> list[Ramp]:
    """One ramp per model, each starting when the previous one has fallen back, so the peaks
    never overlap: model i's ramp spans [lead + i*P, lead + (i+1)*P) with P = rise+hold+fall."""
    if num_models < 1:
        raise LoadShapeError(f"num_models={num_models} must be >= 1")
    period = rise_s + hold_s + fall_s
    if period <= 0:
        raise LoadShapeError("rise_s + hold_s + fall_s must be > 0")
    end = lead_s + num_models * period + tail_s
    return [Ramp(lead_s + i * period, rise_s, hold_s, fall_s, base_users, peak_users, end)
            for i in range(num_models)]


def think_times(rng: random.Random, mean_s: float, count: int) -> list[float]:
    """Exponential pauses between one user's requests: the burstiness of real users."""
    if mean_s < 0:
        raise LoadShapeError(f"mean think time {mean_s} must be >= 0")
    return [rng.expovariate(1.0 / mean_s) if mean_s > 0 else 0.0 for _ in range(count)]


def make_prompt(rng: random.Random, num_words: int) -> str:
    """A prompt of num_words random common words, different for every request."""
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def words_for_tokens(target_tokens: int, sample_words: int, sample_tokens: int) -> int:
    """How many words make about target_tokens, given that sample_words made sample_tokens."""
    if sample_words <= 0 or sample_tokens <= 0 or target_tokens <= 0:
        raise LoadShapeError("word and token counts must be > 0")
    return max(1, round(target_tokens * sample_words / sample_tokens))


# --- the arithmetic of latency -------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks
    (numpy's default method); NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True)
class LatencySummary:
    count: int
    mean: float
    p50: float
    p95: float
    p99: float
    max: float

    def as_dict(self, scale: float = 1.0, digits: int = 4) -> dict[str, float | int]:
        """The summary as JSON-ready numbers, times multiplied by scale (1000: milliseconds)."""
        def r(x: float) -> float | None:
            return None if math.isnan(x) else round(x * scale, digits)
        return {"count": self.count, "mean": r(self.mean), "p50": r(self.p50),
                "p95": r(self.p95), "p99": r(self.p99), "max": r(self.max)}


def summarize(values: Sequence[float]) -> LatencySummary:
    if not values:
        return LatencySummary(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    return LatencySummary(len(values), sum(values) / len(values), percentile(values, 50),
                          percentile(values, 95), percentile(values, 99), max(values))


def throughput(num_tokens: int, first_start: float, last_end: float) -> float:
    """Tokens per second over [first_start, last_end]; 0 when the span is empty."""
    span = last_end - first_start
    return num_tokens / span if span > 0 else 0.0


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when either is missing or the denominator is 0."""
    if math.isnan(numerator) or math.isnan(denominator) or denominator <= 0:
        return math.nan
    return numerator / denominator
