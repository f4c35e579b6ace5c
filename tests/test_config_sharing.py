"""MIG strategy, time-slicing and NVIDIA device-plugin config files."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpud.config.load import ConfigError, parse
from gpud.config.models import (
    DeviceIDStrategy,
    DeviceListStrategy,
    MigStrategy,
    ReplicatedResource,
    Sharing,
    TimeSlicing,
    qualify_resource_name,
)
from gpud.config.nvidia_plugin import (
    NvidiaPluginConfig,
    apply_config_file,
    load_nvidia_plugin_config,
    merge_nvidia_plugin_config,
    parse_nvidia_plugin_config,
)
from tests.conftest import shared_fixture

# shared/fixtures/nvidia-device-plugin-config.yaml, byte for byte (checked below when present).
NVIDIA_FIXTURE = (
    (
        "# A device plugin config file in the NVIDIA k8s-device-plugin v1 schema "
        "(as its README documents it):\n"
    )
    + """\
# flags plus time-slicing of whole GPUs into 4 replicas each.
version: v1
flags:
  migStrategy: "none"
  failOnInitError: true
  nvidiaDriverRoot: "/"
  plugin:
    passDeviceSpecs: false
    deviceListStrategy: "envvar"
    deviceIDStrategy: "uuid"
sharing:
  timeSlicing:
    resources:
    - name: nvidia.com/gpu
      replicas: 4
"""
)
SHARED_FIXTURE = (
    Path(__file__).resolve().parents[2] / "shared/fixtures/nvidia-device-plugin-config.yaml"
)


def problems(text: str) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as err:
        parse(text, "gpud.yaml")
    return err.value.problems


def nvidia_problems(text: str) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as err:
        parse_nvidia_plugin_config(text, "dp.yaml")
    return err.value.problems


def sharing_yaml(*entries: str, extra: str = "") -> str:
    lines = "".join(f"    - {e}\n" for e in entries)
    return f"version: v1\nsharing:\n  timeSlicing:\n{extra}    resources:\n{lines}"


# ---- gpud.yaml ------------------------------------------------------------------------------


def test_defaults_share_nothing_and_advertise_mig_devices_by_profile() -> None:
    cfg = parse("version: v1\n")
    assert cfg.device_plugin.mig_strategy is MigStrategy.MIXED
    assert cfg.device_plugin.config_file is None
    assert cfg.sharing == Sharing()
    assert cfg.sharing.time_slicing is None


@pytest.mark.parametrize("strategy", ["none", "single", "mixed"])
def test_mig_strategy(strategy: str) -> None:
    cfg = parse(f"version: v1\ndevicePlugin:\n  migStrategy: {strategy}\n")
    assert cfg.device_plugin.mig_strategy is MigStrategy(strategy)


def test_existing_device_plugin_keys_still_work() -> None:
    cfg = parse(
        "version: v1\ndevicePlugin:\n  deviceListStrategy: cdi-cri\n  deviceIdStrategy: index\n"
        "  passDeviceSpecs: true\n  configFile: /etc/nvidia/dp.yaml\n"
    )
    dp = cfg.device_plugin
    assert dp.device_list_strategy == [DeviceListStrategy.CDI_CRI]
    assert dp.device_id_strategy is DeviceIDStrategy.INDEX
    assert dp.pass_device_specs
    assert dp.config_file == Path("/etc/nvidia/dp.yaml")


def test_time_slicing_schema() -> None:
    cfg = parse(
        sharing_yaml(
            "{name: gpu, replicas: 4}",
            "{name: nvidia.com/mig-1g.5gb, replicas: 2, rename: mig-small, devices: all}",
            extra="    renameByDefault: true\n    failRequestsGreaterThanOne: true\n",
        )
    )
    ts = cfg.sharing.time_slicing
    assert ts == TimeSlicing(
        rename_by_default=True,
        fail_requests_greater_than_one=True,
        resources=[
            ReplicatedResource(name="nvidia.com/gpu", replicas=4),
            ReplicatedResource(
                name="nvidia.com/mig-1g.5gb", rename="nvidia.com/mig-small", replicas=2
            ),
        ],
    )
    assert [r.advertised_name(True) for r in ts.resources] == [
        "nvidia.com/gpu.shared",
        "nvidia.com/mig-small",
    ]
    assert ts.resources[0].advertised_name(False) == "nvidia.com/gpu"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            sharing_yaml("{name: gpu, replicas: 1}"),
            "sharing.timeSlicing.resources[0].replicas: Input should be greater than or equal to 2",
        ),
        (sharing_yaml("{name: gpu}"), "sharing.timeSlicing.resources[0].replicas: Field required"),
        (sharing_yaml("{replicas: 2}"), "sharing.timeSlicing.resources[0].name: Field required"),
        (
            sharing_yaml("{name: gpu, replicas: 2, devices: [0, 1]}"),
            "sharing.timeSlicing.resources[0].devices: Value error, only 'all' is supported by "
            "gpud, got [0, 1]",
        ),
        (
            sharing_yaml("{name: gpu, replicas: 2, devices: 3}"),
            "resources[0].devices: Value error, only 'all' is supported by gpud, got 3",
        ),
        (
            sharing_yaml("{name: example.com/fpga, replicas: 2}"),
            "only nvidia.com resources can be shared, got 'example.com/fpga'",
        ),
        (
            sharing_yaml("{name: GPU_big, replicas: 2}"),
            "resource name 'nvidia.com/GPU_big' is not valid",
        ),
        (
            sharing_yaml(f"{{name: gpu, replicas: 2, rename: {'x' * 53}}}"),
            "resources[0].rename: Value error, fully-qualified resource name must be 63 "
            "characters or less",
        ),
        (
            sharing_yaml("{name: gpu, replicas: 2}", "{name: nvidia.com/gpu, replicas: 3}"),
            "sharing.timeSlicing: Value error, resources listed more than once: nvidia.com/gpu",
        ),
        (
            sharing_yaml(
                "{name: gpu, replicas: 2}",
                "{name: mig-1g.5gb, replicas: 2, rename: gpu.shared}",
                extra="    renameByDefault: true\n",
            ),
            "several resources would be advertised as nvidia.com/gpu.shared",
        ),
        (
            "version: v1\nsharing:\n  timeSlicing:\n    resources: []\n",
            "sharing.timeSlicing.resources: List should have at least 1 item",
        ),
        (
            "version: v1\nsharing:\n  timeSlicing: {}\n",
            "sharing.timeSlicing.resources: Field required",
        ),
        (
            sharing_yaml("{name: gpu, replicas: 2}", extra="    strategy: packed\n"),
            "sharing.timeSlicing.strategy: Extra inputs are not permitted",
        ),
        (
            "version: v1\nsharing:\n  mps:\n    resources:\n    - {name: gpu, replicas: 2}\n",
            "sharing.mps: Value error, MPS sharing is not supported by gpud",
        ),
        ("version: v1\ndevicePlugin:\n  migStrategy: both\n", "devicePlugin.migStrategy: Input"),
    ],
)
def test_bad_sharing_names_the_key(text: str, expected: str) -> None:
    found = problems(text)
    assert any(expected in p for p in found), found


def test_resource_name_rules() -> None:
    assert qualify_resource_name("gpu") == "nvidia.com/gpu"
    assert qualify_resource_name("nvidia.com/mig-1g.5gb.me") == "nvidia.com/mig-1g.5gb.me"
    name = "x" * 52
    assert qualify_resource_name(name) == f"nvidia.com/{name}"  # 63 exactly
    for bad in ("x" * 53, "-gpu", "gpu.", "a/b", "gpu shared", ""):
        with pytest.raises(ValueError):
            qualify_resource_name(bad)


# ---- NVIDIA plugin config file ---------------------------------------------------------------


def test_inline_fixture_is_the_shared_one() -> None:
    assert shared_fixture(SHARED_FIXTURE.name).read_text() == NVIDIA_FIXTURE


def test_fixture_loads_unchanged(tmp_path: Path) -> None:
    path = SHARED_FIXTURE if SHARED_FIXTURE.exists() else tmp_path / "config.yaml"
    if not SHARED_FIXTURE.exists():
        path.write_text(NVIDIA_FIXTURE)
    got = load_nvidia_plugin_config(path)
    assert got == NvidiaPluginConfig(
        source=str(path),
        mig_strategy=MigStrategy.NONE,
        pass_device_specs=False,
        device_list_strategy=(DeviceListStrategy.ENVVAR,),
        device_id_strategy=DeviceIDStrategy.UUID,
        cdi_annotation_prefix=None,
        sharing=Sharing(
            time_slicing=TimeSlicing(
                resources=[ReplicatedResource(name="nvidia.com/gpu", replicas=4)]
            )
        ),
        warnings=(
            f"{path}: flags.failOnInitError: ignored "
            "(gpud keeps running without a driver and reports why)",
            f"{path}: flags.nvidiaDriverRoot: ignored (gpud uses the host's driver)",
        ),
    )


def test_every_used_key() -> None:
    got = parse_nvidia_plugin_config(
        "version: v1\nflags:\n  migStrategy: mixed\n  plugin:\n    passDeviceSpecs: true\n"
        "    deviceListStrategy: [cdi-annotations, cdi-cri]\n    deviceIDStrategy: index\n"
        "    cdiAnnotationPrefix: example.io/\n"
        "sharing:\n  timeSlicing:\n    renameByDefault: true\n"
        "    failRequestsGreaterThanOne: true\n"
        "    resources: [{name: nvidia.com/mig-1g.10gb, replicas: 2}]\n"
    )
    assert got.mig_strategy is MigStrategy.MIXED
    assert got.pass_device_specs is True
    assert got.device_list_strategy == (
        DeviceListStrategy.CDI_ANNOTATIONS,
        DeviceListStrategy.CDI_CRI,
    )
    assert got.device_id_strategy is DeviceIDStrategy.INDEX
    assert got.cdi_annotation_prefix == "example.io/"
    assert got.sharing is not None and got.sharing.time_slicing is not None
    assert got.sharing.time_slicing.rename_by_default
    assert got.warnings == ()


def test_every_ignored_key_is_accepted_with_a_warning() -> None:
    got = parse_nvidia_plugin_config(
        "version: v1\n"
        "flags:\n  failOnInitError: false\n  restartOnDeviceUnhealthy: true\n"
        "  nvidiaDriverRoot: /run/nvidia/driver\n  nvidiaDevRoot: /\n  gdrcopyEnabled: false\n"
        "  gdsEnabled: false\n  mofedEnabled: false\n  mpsRoot: /run/nvidia/mps\n"
        "  deviceDiscoveryStrategy: auto\n  useNodeFeatureAPI: false\n  gfd: {oneshot: true}\n"
        "  plugin:\n    nvidiaCTKPath: /usr/bin/nvidia-ctk\n    containerDriverRoot: /driver-root\n"
        "    sharedDevicesAllocationPolicy: packed\n"
        "resources: {gpus: [{pattern: '*', name: gpu}]}\nimex: {channelIDs: []}\n",
        "dp.yaml",
    )
    keys = [w.split(": ")[1] for w in got.warnings]
    assert keys == [
        "resources",
        "imex",
        "flags.failOnInitError",
        "flags.restartOnDeviceUnhealthy",
        "flags.nvidiaDriverRoot",
        "flags.nvidiaDevRoot",
        "flags.gdrcopyEnabled",
        "flags.gdsEnabled",
        "flags.mofedEnabled",
        "flags.mpsRoot",
        "flags.deviceDiscoveryStrategy",
        "flags.useNodeFeatureAPI",
        "flags.gfd",
        "flags.plugin.nvidiaCTKPath",
        "flags.plugin.containerDriverRoot",
        "flags.plugin.sharedDevicesAllocationPolicy",
    ]
    assert all(w.startswith("dp.yaml: ") and ": ignored (" in w for w in got.warnings)
    assert got == NvidiaPluginConfig(source="dp.yaml", warnings=got.warnings)


def test_missing_version_means_v1_and_empty_sets_nothing() -> None:
    assert parse_nvidia_plugin_config("flags: {migStrategy: single}\n").mig_strategy is (
        MigStrategy.SINGLE
    )
    assert parse_nvidia_plugin_config("", "x") == NvidiaPluginConfig(source="x")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version: v2\n", "version: unknown version 'v2'"),
        ("version: v1\nflgas: {}\n", "flgas: Extra inputs are not permitted"),
        ("flags:\n  migStratgy: mixed\n", "flags.migStratgy: Extra inputs are not permitted"),
        (
            "flags:\n  plugin:\n    deviceIdStrategy: uuid\n",
            "flags.plugin.deviceIdStrategy: Extra inputs are not permitted",
        ),
        (
            "flags:\n  plugin:\n    deviceListStrategy: volume-mounts\n",
            "flags.plugin.deviceListStrategy[0]: Input should be 'envvar', 'cdi-annotations' or "
            "'cdi-cri'",
        ),
        ("flags:\n  migStrategy: some\n", "flags.migStrategy: Input should be"),
        (
            "sharing:\n  mps:\n    resources: [{name: gpu, replicas: 2}]\n",
            "sharing.mps: Value error, MPS sharing is not supported by gpud",
        ),
        (
            "sharing:\n  timeSlicing:\n    resources: [{name: gpu, replicas: 2, devices: ['0']}]\n",
            "only 'all' is supported by gpud",
        ),
        ("flags: [1]\n", "flags: Input should be a valid dictionary"),
        ("- a\n", "expected a mapping"),
        ("flags: {\n", "not valid YAML"),
    ],
)
def test_bad_nvidia_files_name_the_key(text: str, expected: str) -> None:
    found = nvidia_problems(text)
    assert any(expected in p for p in found), found


def test_json_is_yaml_too() -> None:
    got = parse_nvidia_plugin_config('{"version": "v1", "flags": {"migStrategy": "single"}}')
    assert got.mig_strategy is MigStrategy.SINGLE


def test_missing_nvidia_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_nvidia_plugin_config(tmp_path / "nope.yaml")
    assert err.value.problems == ("file does not exist",)


# ---- merging --------------------------------------------------------------------------------


def test_file_values_win_and_unset_ones_keep_gpud_yaml() -> None:
    cfg = parse(
        "version: v1\ndevicePlugin:\n  passDeviceSpecs: true\n  migStrategy: mixed\n"
        "  cdiAnnotationPrefix: ops.io/\n  deviceListStrategy: [envvar, cdi-cri]\n"
        "sharing:\n  timeSlicing:\n    resources: [{name: gpu, replicas: 8}]\n"
    )
    plugin = parse_nvidia_plugin_config(NVIDIA_FIXTURE, "dp.yaml")
    merged, warnings = merge_nvidia_plugin_config(cfg, plugin)
    dp = merged.device_plugin
    assert dp.mig_strategy is MigStrategy.NONE
    assert dp.pass_device_specs is False
    assert dp.device_list_strategy == [DeviceListStrategy.ENVVAR]
    assert dp.cdi_annotation_prefix == "ops.io/"  # the file does not set it
    assert merged.sharing == plugin.sharing
    assert merged.health == cfg.health and merged.paths == cfg.paths
    assert warnings == (
        "devicePlugin.migStrategy: gpud.yaml's 'mixed' is overridden by dp.yaml's "
        "flags.migStrategy 'none'",
        "devicePlugin.passDeviceSpecs: gpud.yaml's true is overridden by dp.yaml's "
        "flags.plugin.passDeviceSpecs false",
        "devicePlugin.deviceListStrategy: gpud.yaml's ['envvar', 'cdi-cri'] is overridden by "
        "dp.yaml's flags.plugin.deviceListStrategy ['envvar']",
        "sharing: gpud.yaml's sharing is replaced by dp.yaml's",
    )


def test_no_warning_when_gpud_yaml_is_silent_or_agrees() -> None:
    cfg = parse("version: v1\ndevicePlugin:\n  deviceIdStrategy: uuid\n")
    merged, warnings = merge_nvidia_plugin_config(
        cfg, parse_nvidia_plugin_config(NVIDIA_FIXTURE, "dp.yaml")
    )
    assert warnings == ()
    assert merged.sharing.time_slicing is not None


def test_a_file_without_sharing_keeps_gpud_yamls() -> None:
    cfg = parse(sharing_yaml("{name: gpu, replicas: 3}"))
    merged, warnings = merge_nvidia_plugin_config(
        cfg, parse_nvidia_plugin_config("flags: {migStrategy: mixed}\n")
    )
    assert merged.sharing == cfg.sharing
    assert merged.device_plugin.mig_strategy is MigStrategy.MIXED
    assert warnings == ()


def test_apply_config_file(tmp_path: Path) -> None:
    cfg = parse("version: v1\n")
    assert apply_config_file(cfg) == (cfg, ())
    path = tmp_path / "dp.yaml"
    path.write_text(NVIDIA_FIXTURE)
    cfg = parse(f"version: v1\ndevicePlugin:\n  passDeviceSpecs: true\n  configFile: {path}\n")
    merged, warnings = apply_config_file(cfg)
    assert merged.device_plugin.config_file == path
    assert not merged.device_plugin.pass_device_specs
    assert [w.split(": ")[1] for w in warnings] == [
        "flags.failOnInitError",
        "flags.nvidiaDriverRoot",
        "gpud.yaml's true is overridden by " + str(path) + "'s flags.plugin.passDeviceSpecs false",
    ]
    path.write_text("flags: {bogus: 1}\n")
    with pytest.raises(ConfigError) as err:
        apply_config_file(cfg)
    assert err.value.problems == ("flags.bogus: Extra inputs are not permitted (got 1)",)
