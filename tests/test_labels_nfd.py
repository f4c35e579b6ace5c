"""The NFD local feature file: its format against NFD's rules, and the shell that writes it.

The parser and the label checks below are written from shared/reference/cluster-integration.md §3
(nfd-worker's line format and directives, nfd-master's validation and namespaces), independently
of gpud.labels.names, so the file is read back the way NFD reads it. The shell runs on real files;
what nfd-worker would notice is observed with inotify, which its fsnotify watch is built on.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from asyncinotify import Inotify, Mask
from hypothesis import given
from hypothesis import strategies as st

from gpud.labels.nfd import (
    DEFAULT_DIRECTORY,
    FILE_NAME,
    MAX_FILE_BYTES,
    FeatureFileError,
    NfdTarget,
    Outcome,
    publish,
    record_path,
    render,
    withdraw,
)

# ---- NFD's rules, restated for the test --------------------------------------------------------


def nfd_read(text: str) -> dict[str, str]:
    """What nfd-worker's local source makes of a feature file (§3, "Line format"/"Directives").

    Lines are trimmed and empty ones skipped; "#" starts a comment unless it starts "# +", a
    directive (this test refuses any: gpud writes none, no expiry in particular); key=value splits
    at the first "="; a key alone means "true". A later duplicate overrides an earlier one.
    """
    found: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            assert not line.startswith("# +"), f"a directive in gpud's file: {line!r}"
            continue
        key, sep, value = line.partition("=")
        found[key] = value if sep else "true"
    return found


QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def nfd_master_accepts(key: str, value: str) -> bool:
    """nfd-master's validation (§3, "Validation" and "Allowed namespaces", default flags)."""
    if "/" in key:
        prefix, name = key.split("/", 1)
        if not (len(prefix) <= 253 and DNS_SUBDOMAIN.fullmatch(prefix)):
            return False
        if prefix == "kubernetes.io" or prefix.endswith(".kubernetes.io"):
            allowed = ("feature.node.kubernetes.io", "profile.node.kubernetes.io")
            if not any(prefix == a or prefix.endswith("." + a) for a in allowed):
                return False
    else:
        name = key
    return (
        len(name) <= 63
        and QUALIFIED_NAME.fullmatch(name) is not None
        and len(value) <= 63
        and LABEL_VALUE.fullmatch(value) is not None
    )


GFD_LIKE = {
    "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
    "nvidia.com/gpu.count": "8",
    "nvidia.com/gpu.sharing-strategy": "",
    "nvidia.com/mig-1g.10gb.me.count": "7",
    "nvidia.com/cuda.driver-version.revision": "05",
    "example.com/pool": "inference",
}


# ---- rendering -------------------------------------------------------------------------------


def test_file_reads_back_as_the_labels_sorted_with_no_timestamp() -> None:
    file = render(GFD_LIKE)
    assert nfd_read(file.text) == GFD_LIKE
    entries = [line for line in file.text.splitlines() if not line.startswith("#")]
    assert entries == sorted(entries)
    assert all(line == line.strip() and "=" in line for line in entries)
    assert file.text.endswith("\n")
    assert "timestamp" not in file.text
    assert file.rejected == () and file.notes == ()
    # The same labels in another order make the same bytes: nothing but a change rewrites.
    assert render(dict(reversed(list(GFD_LIKE.items())))).text == file.text


def test_what_nfd_master_would_refuse_is_left_out_with_the_reason() -> None:
    labels = {
        "nvidia.com/gpu.machine": "A" * 64,  # over 63 characters
        "nvidia.com/gpu.product": "-NVIDIA-",  # must start and end alphanumeric
        "node-role.kubernetes.io/gpu": "",  # denied namespace
        "feature.node.kubernetes.io/gpu": "true",  # allowed inside kubernetes.io
        "nvidia.com/gpu.count": "8",
    }
    file = render(labels)
    assert {r.name for r in file.rejected} == {
        "nvidia.com/gpu.machine",
        "nvidia.com/gpu.product",
        "node-role.kubernetes.io/gpu",
    }
    assert all(r.reason for r in file.rejected)
    assert nfd_read(file.text) == {
        "feature.node.kubernetes.io/gpu": "true",
        "nvidia.com/gpu.count": "8",
    }
    assert "63" in next(r.reason for r in file.rejected if r.name == "nvidia.com/gpu.machine")


def test_a_name_without_namespace_is_written_with_a_note() -> None:
    # nfd-master prefixes it with feature.node.kubernetes.io/ (§3, "Namespacing"): a nodeSelector
    # on the bare name would not match, which the operator must hear.
    file = render({"accelerator": "nvidia"})
    assert nfd_read(file.text) == {"accelerator": "nvidia"}
    (note,) = file.notes
    assert "feature.node.kubernetes.io/accelerator" in note


def test_a_file_nfd_would_skip_is_refused() -> None:
    many = {f"example.com/label-{i:05d}": "v" * 60 for i in range(1000)}
    with pytest.raises(FeatureFileError, match="65536"):
        render(many)
    fits = dict(list(many.items())[:500])
    assert len(render(fits).text.encode()) <= MAX_FILE_BYTES


label_keys = st.text(min_size=1, max_size=70).filter(lambda k: "\n" not in k and "\r" not in k)


@given(st.dictionaries(label_keys, st.text(max_size=70), max_size=20))
def test_every_line_written_is_one_nfd_master_keeps(labels: dict[str, str]) -> None:
    file = render(labels)
    read = nfd_read(file.text)
    assert read == dict(file.labels)
    assert all(nfd_master_accepts(k, v) for k, v in read.items())
    # Nothing vanishes unexplained: written or rejected with a reason.
    assert set(read) | {r.name for r in file.rejected} == set(labels)


# ---- the shell -------------------------------------------------------------------------------

WATCHED = (
    Mask.CREATE
    | Mask.MODIFY
    | Mask.CLOSE_WRITE
    | Mask.MOVED_FROM
    | Mask.MOVED_TO
    | Mask.DELETE
    | Mask.ATTRIB
)


def changes(directory: Path, action: object) -> list[tuple[str, Mask]]:
    """The (name, event) pairs nfd-worker's watch on ``directory`` would see during ``action``."""
    with Inotify() as inotify:
        inotify.add_watch(directory, WATCHED)
        inotify.sync_timeout = 0.05
        action()  # type: ignore[operator]
        seen = []
        while (event := inotify.sync_get()) is not None:
            seen.append((str(event.name), event.mask & ~Mask.ISDIR))
        return seen


@pytest.fixture
def features(tmp_path: Path) -> Path:
    directory = tmp_path / "features.d"
    directory.mkdir()
    return directory


def target_in(directory: Path, state: Path | None = None, force: bool = False) -> NfdTarget:
    return NfdTarget(directory, force, record_path(state) if state is not None else None)


def test_default_place_and_name() -> None:
    assert NfdTarget().path == DEFAULT_DIRECTORY / "gpud"
    assert str(DEFAULT_DIRECTORY) == "/etc/kubernetes/node-feature-discovery/features.d"


def test_publish_replaces_atomically_through_a_dot_file(features: Path) -> None:
    text = render(GFD_LIKE).text
    seen = changes(features, lambda: publish(target_in(features), text))
    path = features / FILE_NAME
    assert path.read_text() == text
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    # The data went to a temporary dot-file (ignored by nfd-worker) renamed over "gpud": the
    # name "gpud" is never seen half-written.
    written_to = {name for name, mask in seen if mask & (Mask.MODIFY | Mask.CREATE)}
    assert written_to and all(name.startswith(".") for name in written_to)
    assert (FILE_NAME, Mask.MOVED_TO) in seen
    assert sorted(os.listdir(features)) == [FILE_NAME]


def test_unchanged_labels_do_not_touch_the_file(features: Path, tmp_path: Path) -> None:
    text = render(GFD_LIKE).text
    target = target_in(features, tmp_path / "state")
    assert publish(target, text) is Outcome.WRITTEN
    before = (features / FILE_NAME).stat()
    # Again, and again from a "restarted" gpud (a new target value): nothing happens at all.
    assert changes(features, lambda: publish(target, text)) == []
    assert publish(target_in(features, tmp_path / "state"), text) is Outcome.UNCHANGED
    after = (features / FILE_NAME).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_changed_labels_are_one_replace(features: Path) -> None:
    target = target_in(features)
    publish(target, render(GFD_LIKE).text)
    inode = (features / FILE_NAME).stat().st_ino
    changed = render({**GFD_LIKE, "nvidia.com/gpu.count": "4"}).text
    seen = changes(features, lambda: publish(target, changed))
    assert [e for e in seen if e[0] == FILE_NAME] == [(FILE_NAME, Mask.MOVED_TO)]
    assert (features / FILE_NAME).read_text() == changed
    assert (features / FILE_NAME).stat().st_ino != inode


def test_no_nfd_directory_means_no_file_unless_forced(tmp_path: Path) -> None:
    missing = tmp_path / "etc/kubernetes/node-feature-discovery/features.d"
    text = render(GFD_LIKE).text
    assert publish(target_in(missing, tmp_path / "state"), text) is Outcome.NO_DIRECTORY
    assert not (tmp_path / "etc").exists()
    assert not record_path(tmp_path / "state").exists()
    assert publish(target_in(missing, force=True), text) is Outcome.WRITTEN
    assert (missing / FILE_NAME).read_text() == text


def test_a_directory_path_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "features.d"
    not_a_dir.write_text("")
    with pytest.raises(FeatureFileError, match="not a directory"):
        publish(target_in(not_a_dir, force=True), "x=y\n")


def test_a_symlink_at_the_name_is_replaced_never_followed(features: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (features / FILE_NAME).symlink_to(victim)
    text = render(GFD_LIKE).text
    assert publish(target_in(features), text) is Outcome.WRITTEN
    assert not (features / FILE_NAME).is_symlink()
    assert (features / FILE_NAME).read_text() == text
    assert victim.read_text() == "precious\n"
    # A symlink to a file that already holds the very content is still replaced: what NFD reads
    # must be gpud's own file.
    (features / FILE_NAME).unlink()
    victim.write_text(text)
    (features / FILE_NAME).symlink_to(victim)
    assert publish(target_in(features), text) is Outcome.WRITTEN
    assert not (features / FILE_NAME).is_symlink()


def test_a_fifo_at_the_name_is_replaced_without_blocking(features: Path) -> None:
    os.mkfifo(features / FILE_NAME)
    assert publish(target_in(features), "a=b\n") is Outcome.WRITTEN
    assert (features / FILE_NAME).read_text() == "a=b\n"


def test_a_directory_at_the_name_is_refused_and_left_alone(features: Path) -> None:
    (features / FILE_NAME).mkdir()
    (features / FILE_NAME / "keep").write_text("x")
    with pytest.raises(FeatureFileError, match="is a directory"):
        publish(target_in(features), "a=b\n")
    with pytest.raises(FeatureFileError, match="is a directory"):
        withdraw(target_in(features))
    assert (features / FILE_NAME / "keep").read_text() == "x"
    assert sorted(os.listdir(features)) == [FILE_NAME]  # no temporary file left behind


def test_write_failure_is_a_clear_error(features: Path, tmp_path: Path) -> None:
    # gpud's state directory path taken by a file: the record cannot be written (as root too).
    state = tmp_path / "state"
    state.write_text("")
    with pytest.raises(FeatureFileError, match=f"cannot write {record_path(state)}"):
        publish(target_in(features, state), "a=b\n")


def test_withdraw_removes_the_file_and_the_record(features: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    target = target_in(features, state)
    publish(target, "a=b\n")
    assert record_path(state).read_text() == f"{features / FILE_NAME}\n"
    seen = changes(features, lambda: withdraw(target))
    assert seen == [(FILE_NAME, Mask.DELETE)]
    assert not record_path(state).exists()
    assert withdraw(target) is Outcome.ABSENT


def test_withdraw_unlinks_a_symlink_not_its_target(features: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (features / FILE_NAME).symlink_to(victim)
    assert withdraw(target_in(features)) is Outcome.REMOVED
    assert victim.read_text() == "precious\n"


def test_a_moved_directory_takes_the_file_with_it(tmp_path: Path) -> None:
    old, new, state = tmp_path / "old", tmp_path / "new", tmp_path / "state"
    old.mkdir()
    new.mkdir()
    publish(target_in(old, state), "a=b\n")
    assert publish(target_in(new, state), "a=b\n") is Outcome.WRITTEN
    assert not (old / FILE_NAME).exists()
    assert (new / FILE_NAME).read_text() == "a=b\n"
    assert record_path(state).read_text() == f"{new / FILE_NAME}\n"


def test_a_record_never_makes_gpud_delete_anything_else(tmp_path: Path, features: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    other = tmp_path / "important.conf"
    other.write_text("keep\n")
    record_path(state).write_text(f"{other}\n")
    publish(target_in(features, state), "a=b\n")
    withdraw(target_in(features, state))
    assert other.read_text() == "keep\n"
