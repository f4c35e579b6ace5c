"""The MIG journal and selection on disk: what a restarted gpud must be able to trust."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gpud.mig.store import Journal, MigStore, Selection, StoreCorrupt

BALANCED = Selection("all-balanced", "version: v1\n", "layouts.yaml")
ONE_G = Selection("all-1g.5gb", "version: v1\n", "layouts.yaml")
STEPS = ({"kind": "set-mig-mode", "gpu": 0, "enabled": True}, {"kind": "reset-gpu", "gpu": 0})


def test_progress_is_recorded_per_step_and_read_back(tmp_path: Path) -> None:
    store = MigStore(tmp_path)
    assert store.journal() is None
    journal = Journal(BALANCED, "running", STEPS, 0, 0, "", ("GPU-a",))
    store.record(journal)
    plan_written = store.journal_path.stat().st_mtime_ns
    store.record(dataclasses.replace(journal, next_step=1, mutations=1))
    assert store.journal_path.stat().st_mtime_ns == plan_written  # the plan is written once
    seen = MigStore(tmp_path).journal()  # a restarted gpud
    assert seen == dataclasses.replace(journal, next_step=1, mutations=1)


def test_a_new_apply_without_progress_yet_reads_as_running(tmp_path: Path) -> None:
    first = MigStore(tmp_path)
    journal = Journal(ONE_G, "running", STEPS, 0, 0, "")
    first.record(dataclasses.replace(journal, status="done", next_step=2, mutations=2))
    old_progress = first.progress_path.read_bytes()
    # A crash after the next apply wrote its plan but before its first progress record (staged
    # by putting the old record back): the old "done" must not be taken for the new apply's.
    MigStore(tmp_path).record(Journal(BALANCED, "running", STEPS, 0, 0, ""))
    first.progress_path.write_bytes(old_progress)
    assert b'"done"' in old_progress
    seen = MigStore(tmp_path).journal()
    assert seen is not None
    assert (seen.selection, seen.status, seen.next_step) == (BALANCED, "running", 0)


def test_selecting_the_same_layout_again_writes_nothing(tmp_path: Path) -> None:
    store = MigStore(tmp_path)
    store.select(BALANCED)
    before = store.selected_path.stat().st_mtime_ns
    store.select(BALANCED)
    assert store.selected_path.stat().st_mtime_ns == before
    store.select(ONE_G)
    assert MigStore(tmp_path).selection() == ONE_G


@pytest.mark.parametrize("content", [b"{not json", b'{"version": 9}', b'{"version": 1}'])
def test_unreadable_files_are_reported_not_guessed(tmp_path: Path, content: bytes) -> None:
    store = MigStore(tmp_path)
    store.dir.mkdir(parents=True)
    store.journal_path.write_bytes(content)
    store.selected_path.write_bytes(content)
    with pytest.raises(StoreCorrupt, match="move it away"):
        store.journal()
    with pytest.raises(StoreCorrupt, match="move it away"):
        store.selection()
