"""gpud.yaml's ``labels`` section and ``gpud run --nfd-dir``: defaults, static labels checked as
Kubernetes and nfd-master check them, and clear errors through the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpud.cli.gpud_main import build_parser
from gpud.config.load import ConfigError, parse
from gpud.daemon.settings import Overrides, resolve
from gpud.labels.names import computed_by_gpud

GPUD = Path(sys.executable).parent / "gpud"


def test_defaults() -> None:
    labels = parse("version: v1\n").labels
    assert labels.enabled is True
    assert labels.static == {}
    assert labels.nfd.directory == Path("/etc/kubernetes/node-feature-discovery/features.d")
    assert labels.nfd.force is False


def test_static_labels_as_the_guides_set_them() -> None:
    cfg = parse(
        "version: v1\nlabels:\n  static:\n    accelerator: nvidia\n"
        "    example.com/gpu-pool: training\n    nvidia.com/gpu.present: true\n"
        "    example.com/rack: 12\n    feature.node.kubernetes.io/gpu-node: ''\n"
        "  nfd:\n    directory: /srv/nfd/features.d\n    force: true\n  enabled: false\n"
    )
    assert cfg.labels.static == {
        "accelerator": "nvidia",
        "example.com/gpu-pool": "training",
        # YAML's true and 12 are not strings; as label values they read back as written.
        "nvidia.com/gpu.present": "true",
        "example.com/rack": "12",
        "feature.node.kubernetes.io/gpu-node": "",
    }
    assert cfg.labels.nfd.directory == Path("/srv/nfd/features.d")
    assert cfg.labels.nfd.force is True
    assert cfg.labels.enabled is False


@pytest.mark.parametrize(
    ("entry", "where", "why"),
    [
        ("bad key: x", "labels.static.bad key", "letters, digits"),
        ("Example.com/x: y", "labels.static.Example.com/x", "DNS subdomain"),
        ("example.com/: y", "labels.static.example.com/", "name is empty"),
        (f"example.com/{'n' * 64}: y", "labels.static.example.com/", "longer than 63"),
        ("node-role.kubernetes.io/gpu: ''", "labels.static.node-role", "nfd-master refuses"),
        ("nvidia.com/gpu.product: mine", "labels.static.nvidia.com/gpu.product", "computes"),
        ("nvidia.com/mig.config: all-1g.10gb", "labels.static.nvidia.com/mig.config", "computes"),
        ("nvidia.com/mig-1g.10gb.count: '3'", "labels.static.nvidia.com/mig-", "computes"),
        ("example.com/x: two words", "labels.static.example.com/x", "label value"),
        ("example.com/x: -edge-", "labels.static.example.com/x", "label value"),
        (f"example.com/x: {'v' * 64}", "labels.static.example.com/x", "longer than 63"),
        ("example.com/x: 1.10", "labels.static.example.com/x", "in quotes"),
        ("example.com/x: [a]", "labels.static.example.com/x", "in quotes"),
    ],
)
def test_bad_static_labels_are_named_with_the_reason(entry: str, where: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(f"version: v1\nlabels:\n  static:\n    {entry}\n", "gpud.yaml")
    (problem,) = err.value.problems
    assert problem.startswith(where), problem
    assert why in problem, problem


def test_unknown_keys_are_errors() -> None:
    with pytest.raises(ConfigError) as err:
        parse("version: v1\nlabels:\n  nfd:\n    dir: /x\n")
    assert err.value.problems == ("labels.nfd.dir: Extra inputs are not permitted (got '/x')",)


def test_gpud_config_validate_reports_every_bad_label(tmp_path: Path) -> None:
    file = tmp_path / "gpud.yaml"
    file.write_text(
        "version: v1\nlabels:\n  static:\n    accelerator: nvidia\n"
        "    kubernetes.io/gpu: 'yes'\n    example.com/x: a b\n"
    )
    out = subprocess.run(
        [str(GPUD), "config", "validate", str(file)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 2
    lines = [line.strip() for line in out.stderr.splitlines()[1:]]
    assert len(lines) == 2
    assert lines[0].startswith("labels.static.kubernetes.io/gpu.[key]:")
    assert lines[1].startswith("labels.static.example.com/x:")


def test_nfd_dir_flag_wins_over_the_file_at_start_and_reload(tmp_path: Path) -> None:
    file = tmp_path / "gpud.yaml"
    file.write_text("version: v1\nlabels:\n  static: {accelerator: nvidia}\n")
    args = build_parser().parse_args(["run", "--nfd-dir", str(tmp_path / "nfd")])
    settings = resolve(file, Overrides(nfd_dir=args.nfd_dir))
    assert settings.config.labels.nfd.directory == tmp_path / "nfd"
    assert settings.config.labels.static == {"accelerator": "nvidia"}
    file.write_text(
        "version: v1\nlabels:\n  nfd: {directory: /from/file, force: true}\n  enabled: false\n"
    )
    again = settings.reload()
    assert again.config.labels.nfd.directory == tmp_path / "nfd"
    assert again.config.labels.nfd.force is True
    assert again.config.labels.enabled is False
    # Without the flag, the file decides.
    assert resolve(file, Overrides()).config.labels.nfd.directory == Path("/from/file")


@pytest.mark.parametrize(
    ("name", "computed"),
    [
        ("nvidia.com/gpu.product", True),
        ("nvidia.com/gpu.compute.major", True),
        ("nvidia.com/gpu.engines.ofa", True),
        ("nvidia.com/gfd.timestamp", True),
        ("nvidia.com/mig-3g.40gb.count", True),
        ("nvidia.com/vgpu.present", True),
        # The GPU Operator's and other tools' nvidia.com labels are the operator's to set.
        ("nvidia.com/gpu.present", False),
        ("nvidia.com/gpu.deploy.dcgm-exporter", False),
        ("nvidia.com/gpu.workload.config", False),
        ("nvidia.com/gpu.modeline", False),
        ("example.com/gpu.product", False),
    ],
)
def test_which_names_gpud_computes(name: str, computed: bool) -> None:
    assert computed_by_gpud(name) is computed
