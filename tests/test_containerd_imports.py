"""Drop-ins: gpud judges and edits the config containerd really loads, checked by real containerd.

Every scenario is loaded by Debian's containerd 1.6 (/usr/bin/containerd, from scripts/setup)
and containerd 2.x (.cache/containerd2, fetched by scripts/setup) with ``config dump``, and what
``gpudctl toolkit status``/``configure`` say and do must match what those binaries load. The node
states come from tests/golden/containerd (nvidia-ctk >= 1.18 and the GPU Operator, written as
shared/reference/nvidia-ctk-rules.md describes them, and a registry-mirror drop-in).

A node here is a root directory (``GPUD_ROOT``) holding /etc/containerd and a
/usr/bin/containerd that is the real binary of the release under test. Imports must point inside
the root, so the top-level's ``/etc/containerd/conf.d/*.toml`` is written in the form each
release resolves to the same files: containerd 2.x joins a relative glob to the file's
directory (``conf.d/*.toml``), 1.x to its working directory, ``/`` for the service and the root
here (``etc/containerd/conf.d/*.toml``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gpud.host.containerd import ConfigError, RuntimeOptions, configure, read_toml
from gpud.host.containerd_imports import (
    RULES_1X,
    RULES_2X,
    View,
    go_glob,
    load,
    merge,
    parse_release,
    rules_for,
)
from tests.conftest import shared_fixture, unavailable
from tests.test_containerd_config import containerd2

GOLDEN = Path(__file__).resolve().parent / "golden" / "containerd"
DROP_INS = "/etc/containerd/conf.d/*.toml"
BINARY = "/usr/bin/nvidia-container-runtime"
TOOLKIT = "/usr/local/nvidia/toolkit/nvidia-container-runtime"
RELEASES = ("1.6", "2.x")


def containerd16() -> str:
    exe = shutil.which("containerd") or "/usr/bin/containerd"
    if not os.access(exe, os.X_OK):
        pytest.fail("containerd is not installed: run scripts/setup (Debian's containerd 1.6)")
    done = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    release = parse_release(done.stdout)
    if release is None or release.major != 1:
        unavailable(f"{exe} is not containerd 1.x ({done.stdout.strip()})")
    return exe


def binary_of(release: str) -> str:
    return containerd16() if release == "1.6" else containerd2()


@dataclass
class Node:
    root: Path
    release: str
    exe: str
    bin: Path

    @property
    def etc(self) -> Path:
        return self.root / "etc/containerd"

    @property
    def config(self) -> Path:
        return self.etc / "config.toml"

    @property
    def drop_in(self) -> Path:
        return self.etc / "conf.d/99-nvidia.toml"

    def write_top(self, text: str) -> None:
        """The top-level config, its conf.d glob in the form this release resolves inside the
        root (see the module docstring)."""
        local = "conf.d/*.toml" if self.release == "2.x" else "etc/containerd/conf.d/*.toml"
        self.config.write_text(text.replace(f'"{DROP_INS}"', f'"{local}"'))

    def write(self, name: str, text: str) -> Path:
        path = self.etc / "conf.d" / name
        path.write_text(text)
        return path

    def gpudctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "GPUD_ROOT": str(self.root),
            "PATH": f"{self.bin}:{os.environ['PATH']}",
        }
        return subprocess.run(
            [sys.executable, "-m", "gpud.cli.gpudctl", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )

    def calls(self) -> str:
        log = self.bin.parent / "calls.log"
        return log.read_text() if log.exists() else ""

    def status(self) -> dict[str, Any]:
        done = self.gpudctl("toolkit", "status", "-o", "json")
        return json.loads(done.stdout)["containerd"]

    def loads(self) -> dict[str, Any]:
        """What the real containerd loads, by its own config dump (run like the service: the
        root as working directory)."""
        done = subprocess.run(
            [self.exe, "--config", str(self.config), "config", "dump"],
            capture_output=True,
            text=True,
            cwd=self.root,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, (
            f"containerd {self.release} rejected the config:\n{done.stderr}"
        )
        dump = read_toml(done.stdout)
        plugin = (
            "io.containerd.cri.v1.runtime" if self.release == "2.x" else "io.containerd.grpc.v1.cri"
        )
        cri = dump["plugins"].get(plugin, {})
        ctd = cri.get("containerd", {})
        nvidia = ctd.get("runtimes", {}).get("nvidia")
        return {
            "nvidia": nvidia["options"]["BinaryName"] if nvidia else None,
            "default": ctd.get("default_runtime_name"),
            "enable_cdi": cri.get("enable_cdi"),
            "imports": dump.get("imports"),
        }


def fake_tools(tmp_path: Path) -> Path:
    """systemctl and snap that log to calls.log beside the root (restarts are not real here)."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool, answer in (("systemctl", "inactive"), ("snap", "")):
        (tools / tool).write_text(
            f'#!/bin/sh\necho "$0 $*" >> {tmp_path}/calls.log\necho {answer}\n'
        )
        (tools / tool).chmod(0o755)
    return tools


def make_node(tmp_path: Path, release: str) -> Node:
    root = tmp_path / "root"
    (root / "etc/containerd/conf.d").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    exe = binary_of(release)
    (root / "usr/bin/containerd").symlink_to(exe)
    return Node(root, release, exe, fake_tools(tmp_path))


def judged(ctr: dict[str, Any]) -> dict[str, Any]:
    """gpud's judgement in the form of :meth:`Node.loads`."""
    eff = ctr["effective"]
    return {
        "nvidia": eff["binary_name"] if eff["nvidia_runtime"] else None,
        "default": eff["default_runtime_name"],
        "enable_cdi": eff["enable_cdi"],
    }


def real(loaded: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in loaded.items() if k != "imports"}


def golden(name: str) -> str:
    return (GOLDEN / name).read_text()


def gpud_configured_top() -> str:
    """What gpud itself wrote earlier: containerd 1.6's default config, nvidia the default."""
    source = shared_fixture("containerd1.6-config-default.toml").read_text()
    return configure(source, RuntimeOptions(set_as_default=True)).text


# --- the states, as containerd loads them -------------------------------------------------------


def setup_state(node: Node, state: str) -> None:
    if state == "gpu-operator":
        node.write_top(golden("gpu-operator-v2/config.toml"))
        node.drop_in.write_text(golden("gpu-operator-v2/99-nvidia.toml"))
    elif state == "nvidia-ctk-v3":
        node.write_top(golden("nvidia-ctk-v3/config.toml"))
        node.drop_in.write_text(golden("nvidia-ctk-v3/99-nvidia.toml"))
    else:  # gpud configured config.toml, then an operator added a registry mirror
        top = gpud_configured_top().replace("imports = []", f'imports = ["{DROP_INS}"]')
        node.write_top(top)
        node.write("50-registry-mirror.toml", golden("registry-mirror.toml"))


CASES = [
    ("gpu-operator", "1.6"),
    ("gpu-operator", "2.x"),
    ("nvidia-ctk-v3", "2.x"),
    ("mirror", "1.6"),
    ("mirror", "2.x"),
]


@pytest.mark.parametrize(("state", "release"), CASES)
def test_status_reports_what_containerd_loads(tmp_path, state, release):
    node = make_node(tmp_path, release)
    setup_state(node, state)
    loaded = node.loads()
    ctr = node.status()
    assert judged(ctr) == real(loaded)
    eff = ctr["effective"]
    assert ctr["judged_by"].startswith(f"containerd {node.release[:2]}")
    assert ctr["judged_by"].endswith("confirmed by its config dump")
    assert len(eff["files"]) == 2
    if state == "mirror" and release == "1.6":
        # The mirror drop-in replaced the whole CRI table: the runtime of config.toml is gone.
        assert loaded["nvidia"] is None and loaded["default"] == "runc"
        assert ctr["nvidia_runtime"] is False and ctr["default_runtime"] is False
        (override,) = eff["overrides"]
        assert "50-registry-mirror.toml replaces the whole" in override
        assert "containerd.runtimes.nvidia" in override and "config.toml" in override
    elif state == "mirror":
        assert loaded["nvidia"] == BINARY and loaded["default"] == "nvidia"
        assert eff["runtime_file"] == eff["default_runtime_file"] == "/etc/containerd/config.toml"
        assert ctr["nvidia_runtime"] is True and ctr["default_runtime"] is True
    else:
        # nvidia-ctk's drop-in decides: its runtime, and its default "runc" wins over config.toml.
        assert eff["runtime_file"] == "/etc/containerd/conf.d/99-nvidia.toml"
        assert eff["default_runtime_file"] == "/etc/containerd/conf.d/99-nvidia.toml"
        assert loaded["default"] == "runc" and ctr["default_runtime"] is False
        if state == "gpu-operator":
            # The operator's runtime, not the one gpud sets up: status says so.
            assert loaded["nvidia"] == TOOLKIT and ctr["nvidia_runtime"] is False
            assert any(TOOLKIT in u and "99-nvidia.toml" in u for u in ctr["unmet"])
        if release == "1.6":
            assert any("99-nvidia.toml replaces the whole" in o for o in eff["overrides"])


@pytest.mark.parametrize(("state", "release"), CASES)
def test_configure_makes_containerd_run_the_nvidia_default(tmp_path, state, release):
    node = make_node(tmp_path, release)
    setup_state(node, state)
    before = {p: p.read_bytes() for p in node.etc.rglob("*.toml")}
    done = node.gpudctl("toolkit", "configure", "--set-as-default", "--cdi", "-o", "json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    loaded = node.loads()
    # What containerd loads afterwards is what was asked, and what gpud says it is.
    assert loaded["nvidia"] == BINARY and loaded["default"] == "nvidia"
    assert loaded["enable_cdi"] in ((None,) if release == "1.6" else (True,))
    assert judged({"effective": data["effective"]}) == real(loaded)
    edited = {p for p, text in before.items() if p.read_bytes() != text}
    if state == "mirror" and release == "2.x":
        assert not data["changed"] and edited == set()  # 2.x merges: nothing was wrong
    else:
        decider = node.drop_in if state != "mirror" else node.etc / "conf.d/50-registry-mirror.toml"
        assert data["changed"] and edited == {decider}, done.stdout
        assert data["file"] == str(decider) and data["config"] == str(node.config)
        assert data["backup"].startswith(str(decider) + ".gpud-backup-")
        assert not data["backup"].endswith(".toml")
        assert node.calls().count("restart containerd") == 1
        if release == "1.6":
            # containerd 1.6 lists what it loaded: never gpud's backup beside the drop-in.
            assert not any("gpud-backup" in i for i in loaded["imports"])
    # The table form names the file edited and why.
    again = node.gpudctl("toolkit", "configure", "--set-as-default", "--cdi")
    assert again.returncode == 0 and "already configured" in again.stdout, again.stderr
    ctr = node.status()
    assert ctr["nvidia_runtime"] is True and ctr["default_runtime"] is True
    assert judged(ctr) == real(node.loads()) and ctr["problems"] == []


def test_configure_output_names_the_drop_in_it_edited(tmp_path):
    node = make_node(tmp_path, "1.6")
    setup_state(node, "gpu-operator")
    done = node.gpudctl("toolkit", "configure", "--set-as-default")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith(f"{node.drop_in}: configured (version 2)")
    assert f"edited instead of {node.config}" in out and "last file that names" in out
    assert "default runtime: nvidia (/etc/containerd/conf.d/99-nvidia.toml)" in out
    assert "containerd 1.6.20: confirmed by its config dump" in out


# --- refusals: nothing written, the file and the reason named ----------------------------------


def unchanged(node: Node) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in node.etc.rglob("*") if p.is_file()}


def refuse(node: Node, *words: str) -> str:
    before = unchanged(node)
    done = node.gpudctl("toolkit", "configure", "--set-as-default", "--cdi")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "nothing was changed" in done.stderr or "it was not changed" in done.stderr
    for word in words:
        assert word in done.stderr, done.stderr
    assert unchanged(node) == before
    assert "restart" not in node.calls()
    return done.stderr


def test_a_version_3_config_on_containerd_16_is_refused(tmp_path):
    node = make_node(tmp_path, "1.6")
    setup_state(node, "nvidia-ctk-v3")
    # containerd 1.6 loads the file but not its CRI table: no nvidia runtime, whatever it says.
    assert node.loads()["nvidia"] is None
    refuse(node, "config version 3", "containerd 1.6.20 reads versions 1 and 2")


def test_a_version_4_config_on_containerd_21_is_refused(tmp_path):
    node = make_node(tmp_path, "2.x")
    node.config.write_text(
        golden("nvidia-ctk-v3/config.toml").replace("version = 3", "version = 4")
    )
    failed = subprocess.run(
        [node.exe, "--config", str(node.config), "config", "dump"],
        capture_output=True, text=True, cwd=node.root, check=False,
    )  # fmt: skip
    assert failed.returncode != 0 and "equal to or less than `3`" in failed.stderr
    refuse(node, "config version 4", "reads versions up to 3")


def test_a_glob_that_would_load_gpuds_backup_is_refused(tmp_path):
    node = make_node(tmp_path, "2.x")
    node.config.write_text(
        golden("nvidia-ctk-v3/config.toml").replace(f'"{DROP_INS}"', '"conf.d/*"')
    )
    node.drop_in.write_text(golden("nvidia-ctk-v3/99-nvidia.toml"))
    refuse(node, "99-nvidia.toml decides", "/etc/containerd/conf.d/*", "backup")


def test_a_missing_import_is_refused(tmp_path):
    node = make_node(tmp_path, "1.6")
    top = gpud_configured_top().replace("imports = []", 'imports = ["conf.d/site.toml"]')
    node.config.write_text(top)
    failed = subprocess.run(
        [node.exe, "--config", str(node.config), "config", "dump"],
        capture_output=True, text=True, cwd=node.root, check=False,
    )  # fmt: skip
    assert failed.returncode != 0  # containerd 1.6 does not start with it either
    refuse(node, "/etc/containerd/conf.d/site.toml does not exist", "containerd 1.6 does not start")


def test_a_drop_in_of_another_version_is_refused(tmp_path):
    node = make_node(tmp_path, "2.x")
    node.write_top(golden("nvidia-ctk-v3/config.toml"))
    node.drop_in.write_text(golden("gpu-operator-v2/99-nvidia.toml"))
    # containerd 2.1 ignores the CRI settings of the version 2 drop-in in a version 3 config.
    assert node.loads()["nvidia"] is None
    refuse(node, "99-nvidia.toml declares version 2", "version 3")


# --- the model against the binaries: resolution, order, nesting, cycles -------------------------


def test_import_order_nesting_and_cycles_match_containerd(tmp_path):
    """Absolute and relative imports, globs in sorted order, a nested import queued after the
    top-level's own, a cycle: gpud's reading gives what each release loads."""
    base = tmp_path / "cfg"
    (base / "d").mkdir(parents=True)
    cri = '[plugins."io.containerd.grpc.v1.cri".containerd]\n'

    def runtime(name: str) -> str:
        return (
            f'[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{name}]\n'
            f'  runtime_type = "io.containerd.runc.v2"\n'
        )

    (base / "config.toml").write_text(
        f'version = 2\nimports = ["{base}/d/*.toml", "late.toml"]\n{cri}'
        '  default_runtime_name = "top"\n' + runtime("nvidia")
    )
    # b imports nested.toml, which loads after late.toml (breadth first) and imports config.toml.
    (base / "d/b.toml").write_text(
        f'imports = ["../nested.toml"]\n{cri}  default_runtime_name = "b"\n'
    )
    (base / "d/a.toml").write_text(f'{cri}  default_runtime_name = "a"\n')
    (base / "late.toml").write_text(runtime("late"))
    (base / "nested.toml").write_text(
        f'imports = ["config.toml"]\n{cri}  default_runtime_name = "nested"\n'
    )
    view = View(Path("/"))
    for release, rules in (("1.6", RULES_1X), ("2.x", RULES_2X)):
        exe = binary_of(release)
        done = subprocess.run(
            [exe, "--config", str(base / "config.toml"), "config", "dump"],
            capture_output=True, text=True, cwd="/", check=True,
        )  # fmt: skip
        dump = read_toml(done.stdout)
        plugin = "io.containerd.grpc.v1.cri" if release == "1.6" else "io.containerd.cri.v1.runtime"
        ctd = dump["plugins"][plugin]["containerd"]
        graph = load(str(base / "config.toml"), view, rules)
        assert [Path(f.name).name for f in graph.files] == [
            "config.toml", "a.toml", "b.toml", "late.toml", "nested.toml"
        ]  # fmt: skip
        merged = merge(graph)
        assert merged.default_name == ctd["default_runtime_name"] == "nested"
        assert (merged.runtime.value is not None) == ("nvidia" in ctd["runtimes"])
        assert ("late" in merged.runtimes) == ("late" in ctd["runtimes"])
        if release == "1.6":
            assert set(dump["imports"]) == {f.name for f in graph.files}
            # Only the last file's CRI table counts: the top-level's nvidia runtime is gone.
            assert merged.runtime.value is None and set(merged.runtimes) == set()
        else:
            assert merged.runtime.source == str(base / "config.toml")


def test_relative_globs_follow_each_release(tmp_path):
    """containerd 1.x globs a relative import from its working directory, 2.x from the file's."""
    root = tmp_path / "root"
    for where in ("conf.d", "etc/containerd/conf.d"):
        (root / where).mkdir(parents=True)
        (root / where / "x.toml").write_text(
            f'[plugins."io.containerd.grpc.v1.cri".containerd]\ndefault_runtime_name = "{where}"\n'
        )
    config = root / "etc/containerd/config.toml"
    config.write_text('version = 2\nimports = ["conf.d/*.toml"]\n')
    for release in RELEASES:
        done = subprocess.run(
            [binary_of(release), "--config", str(config), "config", "dump"],
            capture_output=True, text=True, cwd=root, check=True,
        )  # fmt: skip
        plugin = "io.containerd.grpc.v1.cri" if release == "1.6" else "io.containerd.cri.v1.runtime"
        theirs = read_toml(done.stdout)["plugins"][plugin]["containerd"]["default_runtime_name"]
        (rules,) = rules_for(
            parse_release(f"containerd x {'1.6.20' if release == '1.6' else '2.1.9'}")
        )
        ours = merge(load("/etc/containerd/config.toml", View(root), rules)).default_name
        assert ours == theirs == ("conf.d" if release == "1.6" else "etc/containerd/conf.d")


# --- backups ------------------------------------------------------------------------------------


def test_backups_are_rotated_in_microk8s_args_directory(tmp_path):
    root = tmp_path / "root"
    args = root / "var/snap/microk8s/current/args"
    args.mkdir(parents=True)
    (root / "snap/microk8s").mkdir(parents=True)
    template = args / "containerd-template.toml"
    source = shared_fixture("microk8s-containerd-template.toml").read_text()
    node = Node(root, "none", "", fake_tools(tmp_path))
    first_backup = None
    for run in range(8):
        template.write_text(source + f"# revision {run}\n")
        done = node.gpudctl("toolkit", "configure", "-o", "json")
        assert done.returncode == 0, done.stderr
        backup = json.loads(done.stdout)["backup"]
        first_backup = first_backup or backup
    backups = sorted(p for p in args.iterdir() if ".gpud-backup-" in p.name)
    assert len(backups) == 5
    # The first backup (the template before gpud ever touched it) is the one always kept.
    assert str(backups[0]) == first_backup and backups[0].read_text().endswith("# revision 0\n")
    assert backups[-1].read_text().endswith("# revision 7\n")
    assert not any(p.name.endswith(".toml") for p in backups)
    assert len(list(args.iterdir())) == 6


# --- doctor -------------------------------------------------------------------------------------


@pytest.mark.parametrize("release", RELEASES)
def test_doctor_names_the_drop_in_that_decides(tmp_path, release):
    node = make_node(tmp_path, release)
    setup_state(node, "mirror")
    done = node.gpudctl("--socket", str(tmp_path / "none.sock"), "doctor", "-o", "json")
    checks = {(c["area"], c["name"]): c for c in json.loads(done.stdout)["checks"]}
    runtime = checks[("toolkit", "runtime")]
    if release == "1.6":
        # containerd 1.6 loads the mirror drop-in's CRI table alone: no nvidia runtime at all.
        assert node.loads()["nvidia"] is None
        assert runtime["ok"] is False and runtime["fix"] == "sudo gpudctl toolkit configure"
        assert "50-registry-mirror.toml replaces the whole" in runtime["detail"]
    else:
        assert node.loads()["nvidia"] == BINARY
        assert runtime["ok"] is True
        assert (
            runtime["detail"]
            == f"nvidia runtime ({BINARY}) in /etc/containerd/config.toml, the default"
        )


# --- putting the file back ----------------------------------------------------------------------


def test_a_result_containerd_would_not_load_as_promised_is_put_back(tmp_path):
    """containerd's own dump has the last word. A containerd whose dump loses the nvidia runtime
    after the edit (simulated: the one thing no real binary does on purpose) gets the file back."""
    node = make_node(tmp_path, "2.x")
    setup_state(node, "nvidia-ctk-v3")
    real_binary = node.exe
    fake = node.root / "usr/bin/containerd"
    fake.unlink()
    # Answers like containerd 2.1.9, but once the drop-in names nvidia the default, its dump
    # shows the runtime gone.
    fake.write_text(
        "#!/bin/sh\n"
        f"if grep -q 'default_runtime_name = \"nvidia\"' {node.drop_in}; then\n"
        f'  exec {real_binary} --config {node.root}/empty.toml "$3" "$4"\n'
        "fi\n"
        f'exec {real_binary} "$@"\n'
    )
    fake.chmod(0o755)
    (node.root / "empty.toml").write_text("version = 3\n")
    before = unchanged(node)
    done = node.gpudctl("toolkit", "configure", "--set-as-default")
    assert done.returncode == 1, done.stdout
    assert "has no nvidia runtime" in done.stderr and "was put back as it was" in done.stderr
    after = unchanged(node)
    assert {p: v[0] for p, v in after.items()} == {p: v[0] for p, v in before.items()}
    assert not list(node.etc.rglob("*.gpud-backup-*")) and "restart" not in node.calls()


# --- no containerd to ask -----------------------------------------------------------------------


def test_without_a_binary_the_edit_holds_for_containerd_1_and_2(tmp_path):
    """containerd not installed yet: the edit goes where both rule sets see it, and both real
    binaries then load the nvidia default (imports absolute, as on a node)."""
    etc = tmp_path / "etc"
    (etc / "conf.d").mkdir(parents=True)
    config = etc / "config.toml"
    config.write_text(
        gpud_configured_top().replace("imports = []", f'imports = ["{etc}/conf.d/*.toml"]')
    )
    mirror = etc / "conf.d/50-registry-mirror.toml"
    mirror.write_text(golden("registry-mirror.toml"))
    empty = tmp_path / "root"
    empty.mkdir()
    node = Node(empty, "none", "", fake_tools(tmp_path))
    done = node.gpudctl(
        "toolkit", "configure", "--config", str(config), "--set-as-default", "-o", "json"
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["file"] == str(mirror) and data["changed"]
    assert data["judged_by"].startswith("the rules of containerd 1.x and containerd 2.x")
    for release in RELEASES:
        loaded = subprocess.run(
            [binary_of(release), "--config", str(config), "config", "dump"],
            capture_output=True, text=True, cwd="/", check=True,
        )  # fmt: skip
        plugin = "io.containerd.grpc.v1.cri" if release == "1.6" else "io.containerd.cri.v1.runtime"
        ctd = read_toml(loaded.stdout)["plugins"][plugin]["containerd"]
        assert ctd["default_runtime_name"] == "nvidia", release
        assert ctd["runtimes"]["nvidia"]["options"]["BinaryName"] == BINARY, release


# --- the pieces ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "release"),
    [
        ("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3", "1.6.20"),
        ("containerd containerd.io 1.7.27 05044ec0a9a75232cad458027ca83437aae3f4da", "1.7.27"),
        ("containerd github.com/containerd/containerd v1.7.28 b98a3aace656", "1.7.28"),
        ("containerd github.com/containerd/containerd/v2 2.1.9+unknown ", "2.1.9"),
        ("containerd: command not found", None),
    ],
)
def test_containerd_version_output(output, release):
    parsed = parse_release(output)
    assert (str(parsed) if parsed else None) == release


def test_rules_per_release():
    def rules(text: str) -> Any:
        (one,) = rules_for(parse_release(f"containerd x {text}"))
        return one

    assert not rules("1.7.27").deep_merge and not rules("1.7.27").globs_from_file
    assert rules("1.6.20").cdi_default is None and rules("1.7.27").cdi_default is False
    assert rules("2.0.0").deep_merge and rules("2.0.0").globs_from_file
    assert rules("2.0.0").cdi_default is True and not rules("2.0.0").reads_v1_cri
    assert (rules("2.2.3").max_version, rules("2.3.0").max_version) == (3, 4)
    assert rules_for(None) == (RULES_1X, RULES_2X)


def test_go_globs(tmp_path):
    for name in ("b.toml", "a.toml", ".hidden.toml", "a.toml.gpud-backup-20250101T000000Z", "x"):
        (tmp_path / name).write_text("")
    view = View(Path("/"))
    assert go_glob(f"{tmp_path}/*.toml", view) == [
        f"{tmp_path}/.hidden.toml", f"{tmp_path}/a.toml", f"{tmp_path}/b.toml"
    ]  # fmt: skip
    assert go_glob(f"{tmp_path}/[^a.]*", view) == [f"{tmp_path}/b.toml", f"{tmp_path}/x"]
    assert go_glob(f"{tmp_path}/\\x", view) == [f"{tmp_path}/x"]
    assert go_glob(f"{tmp_path}/nowhere/*.toml", view) == []
    with pytest.raises(ConfigError, match="malformed"):
        go_glob(f"{tmp_path}/[a", view)
