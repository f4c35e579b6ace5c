"""How many Events gpud may send, so that a flapping GPU or an XID storm cannot flood the API
server (every Event is an etcd write that the whole cluster pays for).

Two token buckets must both have a token for an Event to go: one per key (an Event reason and
what it is about, e.g. ``("GPUXidError", "GPU-…")``), and one for the whole node. What they
hold back is not lost without a word: per key, the number held back and the last one are kept,
and that last one goes out as soon as both buckets allow, saying how many it stands for (so the
cluster learns of the storm and of its end). An Event that goes out on a key with a count says
it as well.

The figures (:class:`Limits`, docs/cluster.md): per key 5 at once, then one a minute; per node 20
at once, then one every 6 s (10 a minute). kubelet's own spam filter allows 25 per object and
source, then one per 5 minutes.

Pure: every call takes the time (``time.monotonic()`` in gpud) as an argument.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Limits:
    key_burst: int = 5
    key_every_s: float = 60.0
    node_burst: int = 20
    node_every_s: float = 6.0


class TokenBucket:
    """``burst`` tokens at most; one more every ``every_s`` seconds."""

    def __init__(self, burst: int, every_s: float, now: float) -> None:
        self.burst = float(burst)
        self.every_s = every_s
        self.tokens = float(burst)
        self.at = now

    def _refill(self, now: float) -> None:
        if now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) / self.every_s)
            self.at = now

    def ready(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= 1.0

    def take(self) -> None:
        self.tokens -= 1.0

    def wait_s(self, now: float) -> float:
        """Seconds until a token is there (0 when one is)."""
        self._refill(now)
        return max(0.0, (1.0 - self.tokens) * self.every_s)


@dataclass(frozen=True, slots=True)
class Passed(Generic[T]):
    """An item let through; ``held_back`` more like it (same key) were not sent before it,
    since ``since``."""

    item: T
    held_back: int = 0
    since: float = 0.0


@dataclass(slots=True)
class _Held(Generic[T]):
    count: int
    since: float
    last: T


class EventLimiter(Generic[T]):
    """The two buckets and what they held back, per key."""

    def __init__(self, now: float, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._node = TokenBucket(self.limits.node_burst, self.limits.node_every_s, now)
        self._keys: dict[Hashable, TokenBucket] = {}
        self._held: dict[Hashable, _Held[T]] = {}
        self.held_back_total = 0

    def _bucket(self, key: Hashable, now: float) -> TokenBucket:
        bucket = self._keys.get(key)
        if bucket is None:
            bucket = self._keys[key] = TokenBucket(
                self.limits.key_burst, self.limits.key_every_s, now
            )
        return bucket

    def offer(self, key: Hashable, item: T, now: float) -> Passed[T] | None:
        """``item`` with what was held back before it on ``key``, or None: held back."""
        bucket = self._bucket(key, now)
        held = self._held.get(key)
        if bucket.ready(now) and self._node.ready(now):
            bucket.take()
            self._node.take()
            if held is None:
                return Passed(item)
            del self._held[key]
            return Passed(item, held.count, held.since)
        self.held_back_total += 1
        if held is None:
            self._held[key] = _Held(1, now, item)
        else:
            held.count += 1
            held.last = item
        return None

    def holding(self, key: Hashable) -> int:
        held = self._held.get(key)
        return held.count if held is not None else 0

    def release(self, now: float) -> list[Passed[T]]:
        """The last item held back on each key whose buckets allow it now (oldest hold
        first), each standing for the others held back with it."""
        out: list[Passed[T]] = []
        for key, held in sorted(self._held.items(), key=lambda kv: kv[1].since):
            bucket = self._bucket(key, now)
            if not (bucket.ready(now) and self._node.ready(now)):
                continue
            bucket.take()
            self._node.take()
            del self._held[key]
            out.append(Passed(held.last, held.count - 1, held.since))
        return out

    def next_release_s(self, now: float) -> float | None:
        """Seconds until :meth:`release` has something to give, None when nothing is held."""
        if not self._held:
            return None
        node = self._node.wait_s(now)
        return max(node, min(self._bucket(k, now).wait_s(now) for k in self._held))

    def forget_idle(self, now: float) -> None:
        """Drop the buckets of keys that are full again and hold nothing (a bounded map)."""
        for key in [k for k, b in self._keys.items() if k not in self._held]:
            bucket = self._keys[key]
            bucket.ready(now)
            if bucket.tokens >= bucket.burst:
                del self._keys[key]
