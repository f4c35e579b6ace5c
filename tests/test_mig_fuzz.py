"""A running gpud fed generated and mutated layout files and gRPC requests (hypothesis).

What a user (any member of the gpud group, for a dry run or an assert) can send must come back
as a result or a clear error, never a crash, a traceback or a reply the size of an alias bomb's
expansion; the daemon must stay up and small, and must never hold its MIG lock long. One gpud on
a simulated a30x4 (4 A30s: real applies among the dry runs stay quick) serves every example, so
what one input leaves behind (memory, a layout, a journal) meets the next.

Bounds, checked through the daemon's own record rather than by timing anything here:
* RSS below RSS_BOUND_MIB (an idle gpud has about 60 MiB; the review's alias bomb took 1.4 GB);
* the MIG lock held at most LOCK_BOUND_S at a time (``GetMigState.lock_longest_held_s``, the
  longest hold the daemon saw since it started). A dry run or a refused apply holds it to read
  4 GPUs and plan (milliseconds); a real apply also for its NVML calls with a journal write
  before each, and for kubelet's registration of new resources (about a second for the largest
  change here, on a shared 2-core machine). The bound leaves that tenfold room, and is a third of
  the 30 s that one count of 10^8 held the lock before inputs were bounded;
* every message under MESSAGE_BOUND characters (refusals echo the input cut short).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpud._proto.gpud.v1 import gpud_pb2
from gpud.mig.layout import MAX_LAYOUT_BYTES, bundled_text
from tests.support.mignode import MigNode, start, stopped_after

pytestmark = pytest.mark.integration

EXAMPLES = 600
RSS_BOUND_MIB = 150
LOCK_BOUND_S = 10.0
MESSAGE_BOUND = 16 * 1024

# A30 names first (the machine's), then other boards', then names no board has.
PROFILES = [
    "1g.6gb",
    "1g.6gb+me",
    "2g.12gb",
    "2g.12gb+me",
    "4g.24gb",
    "1c.2g.12gb",
    "1c.4g.24gb",
    "2c.4g.24gb",
    "1g.5gb",
    "3g.20gb",
    "7g.40gb",
    "1c.3g.20gb",
    "9g.99gb",
    "1g.6gb-me",
    "0g.1gb",
]
YAML_SYMBOLS = "&*[]{}:-,\n \"'!|>#%@`?0123456789abcgmx."


@pytest.fixture
def nodes(short_tmp: Path) -> Iterator[list[MigNode]]:
    with stopped_after() as started:
        yield started


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# ---- inputs -------------------------------------------------------------------------------------

anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
counts = st.integers(-2, 9) | st.sampled_from([10**8, 10**21, 2**200]) | anything
devices = st.sampled_from(["all", "ALL"]) | st.lists(st.integers(-1, 6), max_size=5) | anything
names = st.sampled_from(["fuzz", "all-1g.6gb", "all-balanced", "all-disabled"]) | st.text(
    max_size=12
)


@st.composite
def entries(draw: st.DrawFn) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "devices": draw(devices),
        "mig-enabled": draw(st.booleans() | anything),
    }
    if draw(st.booleans()):
        entry["mig-devices"] = draw(
            st.dictionaries(st.sampled_from(PROFILES) | st.text(max_size=10), counts, max_size=4)
        )
    if draw(st.integers(0, 4)) == 0:
        entry["device-filter"] = draw(
            st.sampled_from(["0x20B710DE", ["0x20B710DE", "0x20B010DE"], "0xZZ", 0x20B710DE])
            | anything
        )
    if draw(st.integers(0, 8)) == 0:
        entry[draw(st.text(max_size=8))] = draw(anything)
    return entry


@st.composite
def generated(draw: st.DrawFn) -> str:
    """A layout file built as data, mostly well-formed, then written as YAML or JSON."""
    configs = draw(st.dictionaries(names, st.lists(entries(), max_size=4), min_size=0, max_size=3))
    document: Any = {
        "version": draw(st.sampled_from(["v1", "v1", "v2", 1])),
        "mig-configs": configs,
    }
    if draw(st.integers(0, 10)) == 0:
        document = draw(anything)
    if draw(st.booleans()):
        return json.dumps(document)
    return yaml.safe_dump(document, default_flow_style=draw(st.booleans()))


@st.composite
def valid(draw: st.DrawFn) -> str:
    """A well-formed layout for the A30s, which may or may not fit them."""
    entries = []
    for _ in range(draw(st.integers(1, 3))):
        on = draw(st.booleans())
        entry: dict[str, Any] = {
            "devices": draw(st.just("all") | st.lists(st.integers(0, 3), min_size=1, max_size=4)),
            "mig-enabled": on,
        }
        if on:
            entry["mig-devices"] = draw(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "1g.6gb": st.integers(0, 4),
                        "1g.6gb+me": st.integers(0, 1),
                        "2g.12gb": st.integers(0, 2),
                        "4g.24gb": st.integers(0, 1),
                        "1c.4g.24gb": st.integers(0, 4),
                        "2c.4g.24gb": st.integers(0, 2),
                    },
                )
            )
        entries.append(entry)
    return yaml.safe_dump({"version": "v1", "mig-configs": {"fuzz": entries}})


@st.composite
def mutated(draw: st.DrawFn) -> str:
    """A real file (gpud's bundled layouts, or a generated one) with cuts, insertions and
    repeats of YAML's own symbols."""
    text = draw(st.sampled_from([bundled_text()]) | generated())
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["cut", "insert", "repeat"]))
        if op == "cut":
            text = text[:at] + text[at + draw(st.integers(1, 200)) :]
        elif op == "insert":
            text = text[:at] + draw(st.text(alphabet=YAML_SYMBOLS, max_size=20)) + text[at:]
        else:
            piece = text[at : at + draw(st.integers(1, 60))]
            text = text[:at] + piece * draw(st.integers(2, 50)) + text[at:]
    return text


@st.composite
def hostile(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["bomb", "deep", "size", "count", "wide"]))
    if kind == "bomb":
        width, depth = draw(st.integers(2, 12)), draw(st.integers(2, 9))
        lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
        for i in range(1, depth):
            lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
        return "\n".join(lines) + f"\nversion: v1\nmig-configs:\n  fuzz: [*l{depth - 1}]\n"
    if kind == "deep":
        depth = draw(st.integers(10, 100_000))
        return "[" * depth + "]" * depth
    if kind == "size":
        return "#" * (MAX_LAYOUT_BYTES + draw(st.integers(-2, 2)))
    if kind == "count":
        n = draw(st.sampled_from(["100000000", "1" + "0" * 21, "9" * 5000, "0x" + "F" * 9000]))
        return (
            "version: v1\nmig-configs:\n  fuzz:\n    - devices: all\n      mig-enabled: true\n"
            f"      mig-devices: {{1g.6gb: {n}}}\n"
        )
    rows = draw(st.integers(100, 3000))
    return "version: v1\nmig-configs:\n  fuzz:\n" + "    - devices: [0]\n" * rows


BUNDLED_NAMES = ["all-disabled", "all-enabled", "all-balanced", "all-1g.6gb", "all-4g.24gb"]


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A call (a dry run, an apply or an assert) and its fields, in set proportions: a third
    well-formed layouts, a sixth gpud's own layouts by name (no text sent), the rest generated,
    mutated and hostile files; one name in ten is junk."""
    roll = draw(st.integers(0, 99))
    text: str | None
    if roll < 35:
        text = draw(valid())
    elif roll < 50:
        text = None
    elif roll < 70:
        text = draw(generated())
    elif roll < 85:
        text = draw(mutated())
    else:
        text = draw(hostile())
    name = draw(st.sampled_from(BUNDLED_NAMES)) if text is None else "fuzz"
    if draw(st.integers(0, 9)) == 0:
        name = draw(names | st.text(min_size=200, max_size=3000))
    fields: dict[str, Any] = {
        "config_name": name,
        "config_source": draw(st.sampled_from(["", "/etc/x.yaml"]) | st.text(max_size=300)),
    }
    if text is not None:
        fields["config_yaml"] = text
    return draw(st.sampled_from(["dry-run", "apply", "assert"])), fields


# ---- the test -----------------------------------------------------------------------------------


def check_message(text: str) -> None:
    assert text, "an error says what is wrong"
    assert len(text) < MESSAGE_BOUND, f"{len(text)} characters: {text[:300]!r}"
    assert "Traceback" not in text


def test_any_input_gets_a_result_or_a_clear_error_and_gpud_stays_up_small_and_unlocked(
    short_tmp: Path, nodes: list[MigNode]
) -> None:
    node = start(short_tmp, "a30x4")
    nodes.append(node)
    assert node.gpud.pid is not None
    pid, stub = node.gpud.pid, node.gpud.stub
    seen: Counter[str] = Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(requests())
    def one(case: tuple[str, dict[str, Any]]) -> None:
        call, fields = case
        try:
            if call == "assert":
                found = stub.AssertMigLayout(gpud_pb2.AssertMigLayoutRequest(**fields), timeout=60)
                seen["assert: applied" if found.applied else "assert: differs"] += 1
                for line in found.differences:
                    check_message(line)
            else:
                reply = stub.ApplyMigLayout(
                    gpud_pb2.ApplyMigLayoutRequest(
                        **fields, dry_run=call == "dry-run", force=call == "apply"
                    ),
                    timeout=60,
                )
                seen[f"{call}: {reply.result} {reply.error_kind}".strip()] += 1
                assert reply.result in ("applied", "unchanged", "planned", "failed"), reply
                if reply.result == "failed":
                    assert reply.error_kind in ("invalid", "refused", "error"), reply
                    check_message(reply.message)
        except grpc.RpcError as exc:
            # Only a bad layout may end an assert with a status; an apply answers in its reply.
            assert call == "assert" and exc.code() is grpc.StatusCode.INVALID_ARGUMENT, exc
            check_message(exc.details())
            seen["assert: invalid"] += 1
        assert node.gpud.running(), "gpud died"
        if sum(seen.values()) % 25 == 0:
            assert rss_mib(pid) < RSS_BOUND_MIB

    one()
    tried = sum(seen.values())
    state = stub.GetMigState(gpud_pb2.GetMigStateRequest(), timeout=30)
    rss = rss_mib(pid)
    print(
        f"fuzz: {tried} inputs, {dict(sorted(seen.items()))}; RSS {rss:.0f} MiB; "
        f"longest MIG lock hold {state.lock_longest_held_s * 1000:.0f} ms "
        f"({state.lock_longest_held_by})"
    )
    assert tried >= EXAMPLES // 2, "hypothesis ran the examples"
    assert rss < RSS_BOUND_MIB
    assert state.lock_longest_held_s < LOCK_BOUND_S, state.lock_longest_held_by
    assert seen["dry-run: planned"] + seen["apply: applied"] > 0, "some inputs were valid layouts"
    assert "Traceback" not in node.gpud.log()
