"""Adopting an NVIDIA k8s-device-plugin config file (``devicePlugin.configFile``).

Operators moving from NVIDIA's plugin already have a ``version: v1`` file (often a ConfigMap) with
``flags`` and ``sharing``. gpud reads the parts that mean something to it:

* ``flags.migStrategy``
* ``flags.plugin.{passDeviceSpecs, deviceListStrategy, deviceIDStrategy, cdiAnnotationPrefix}``
* ``sharing`` (time-slicing only; ``sharing.mps`` is refused, as in gpud.yaml)

Keys of NVIDIA's schema that configure things gpud does differently or not at all (driver roots,
GFD, GDS/MOFED/GDRCopy, IMEX, ``resources``, ...) are accepted and reported in
:attr:`NvidiaPluginConfig.warnings`, so an unchanged ConfigMap still loads. Any other key is an
error naming it: a typo must not silently change how GPUs are advertised.

Problems are reported as :class:`gpud.config.load.ConfigError`, one "key.path: message" line each,
like gpud.yaml's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gpud.config.load import ConfigError, validation_problems, yaml_mapping
from gpud.config.models import (
    Config,
    DeviceIDStrategy,
    DeviceListStrategy,
    DevicePlugin,
    MigStrategy,
    Sharing,
)

# Keys of NVIDIA's v1 schema that gpud accepts and ignores, each with the reason the warning gives.
_IGNORED_TOP: dict[str, str] = {
    "resources": "custom resource naming is ignored by NVIDIA's plugin too",
    "imex": "gpud does not inject IMEX channels",
}
_IGNORED_FLAGS: dict[str, str] = {
    "failOnInitError": "gpud keeps running without a driver and reports why",
    "restartOnDeviceUnhealthy": "gpud updates device health in place",
    "nvidiaDriverRoot": "gpud uses the host's driver",
    "nvidiaDevRoot": "gpud uses the host's /dev",
    "gdrcopyEnabled": "gpud does not inject GDRCopy",
    "gdsEnabled": "gpud does not inject GPUDirect Storage",
    "mofedEnabled": "gpud does not inject MOFED",
    "mpsRoot": "gpud does not support MPS",
    "deviceDiscoveryStrategy": "gpud discovers GPUs with NVML",
    "useNodeFeatureAPI": "a GPU feature discovery setting",
    "gfd": "GPU feature discovery settings",
}
_IGNORED_PLUGIN_FLAGS: dict[str, str] = {
    "nvidiaCTKPath": "gpud does not generate CDI specs",
    "nvidiaCDIHookPath": "gpud does not generate CDI specs",
    "containerDriverRoot": "gpud runs on the host",
    "sharedDevicesAllocationPolicy": "gpud always spreads shared devices (distributed)",
}


class _NvidiaStrict(BaseModel):
    # NVIDIA's spelling is not regular camelCase ("deviceIDStrategy"), so aliases are explicit.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class _PluginFlags(_NvidiaStrict):
    pass_device_specs: bool | None = Field(None, alias="passDeviceSpecs")
    device_list_strategy: list[DeviceListStrategy] | None = Field(
        None, alias="deviceListStrategy", min_length=1
    )
    device_id_strategy: DeviceIDStrategy | None = Field(None, alias="deviceIDStrategy")
    cdi_annotation_prefix: str | None = Field(None, alias="cdiAnnotationPrefix")

    @field_validator("device_list_strategy", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        # A single string or a list, as in NVIDIA's plugin (and gpud.yaml).
        if isinstance(value, str):
            return [value]
        return value


class _Flags(_NvidiaStrict):
    mig_strategy: MigStrategy | None = Field(None, alias="migStrategy")
    plugin: _PluginFlags | None = None


class _File(_NvidiaStrict):
    version: Literal["v1"] = "v1"
    flags: _Flags | None = None
    sharing: Sharing | None = None


@dataclass(frozen=True)
class NvidiaPluginConfig:
    """What gpud takes from an NVIDIA plugin config file; None means the file does not set it."""

    source: str
    mig_strategy: MigStrategy | None = None
    pass_device_specs: bool | None = None
    device_list_strategy: tuple[DeviceListStrategy, ...] | None = None
    device_id_strategy: DeviceIDStrategy | None = None
    cdi_annotation_prefix: str | None = None
    sharing: Sharing | None = None
    # One "<source>: key: ignored (why)" line per key gpud accepted but ignores.
    warnings: tuple[str, ...] = ()

    def device_plugin_settings(self) -> dict[str, Any]:
        """The ``DevicePlugin`` fields this file sets, by field name."""
        values: dict[str, Any] = {
            "mig_strategy": self.mig_strategy,
            "pass_device_specs": self.pass_device_specs,
            "device_list_strategy": (
                None if self.device_list_strategy is None else list(self.device_list_strategy)
            ),
            "device_id_strategy": self.device_id_strategy,
            "cdi_annotation_prefix": self.cdi_annotation_prefix,
        }
        return {k: v for k, v in values.items() if v is not None}


# Where each DevicePlugin field lives in NVIDIA's file, for messages.
_NVIDIA_KEYS = {
    "mig_strategy": "flags.migStrategy",
    "pass_device_specs": "flags.plugin.passDeviceSpecs",
    "device_list_strategy": "flags.plugin.deviceListStrategy",
    "device_id_strategy": "flags.plugin.deviceIDStrategy",
    "cdi_annotation_prefix": "flags.plugin.cdiAnnotationPrefix",
}


def _strip_ignored(
    data: dict[str, Any], ignored: dict[str, str], where: str, warnings: list[str]
) -> dict[str, Any]:
    kept = {}
    for key, value in data.items():
        if key in ignored:
            warnings.append(f"{where}{key}: ignored ({ignored[key]})")
        else:
            kept[key] = value
    return kept


def parse_nvidia_plugin_config(
    text: str, source: str = "<nvidia plugin config>"
) -> NvidiaPluginConfig:
    """Parse the text of an NVIDIA plugin config file (YAML or JSON).

    A missing ``version`` means ``v1``, as in NVIDIA's plugin; an empty document sets nothing.
    """
    data = yaml_mapping(text, source)
    if data.get("version", "v1") != "v1":
        raise ConfigError(
            source,
            (f"version: unknown version {data['version']!r}; gpud reads NVIDIA's version v1",),
        )

    warnings: list[str] = []
    data = _strip_ignored(data, _IGNORED_TOP, f"{source}: ", warnings)
    flags = data.get("flags")
    if isinstance(flags, dict):
        flags = _strip_ignored(flags, _IGNORED_FLAGS, f"{source}: flags.", warnings)
        plugin = flags.get("plugin")
        if isinstance(plugin, dict):
            flags["plugin"] = _strip_ignored(
                plugin, _IGNORED_PLUGIN_FLAGS, f"{source}: flags.plugin.", warnings
            )
        data["flags"] = flags

    try:
        parsed = _File.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, validation_problems(exc)) from None

    flags_model = parsed.flags or _Flags()
    plugin_model = flags_model.plugin or _PluginFlags()
    return NvidiaPluginConfig(
        source=source,
        mig_strategy=flags_model.mig_strategy,
        pass_device_specs=plugin_model.pass_device_specs,
        device_list_strategy=(
            None
            if plugin_model.device_list_strategy is None
            else tuple(plugin_model.device_list_strategy)
        ),
        device_id_strategy=plugin_model.device_id_strategy,
        cdi_annotation_prefix=plugin_model.cdi_annotation_prefix,
        sharing=parsed.sharing,
        warnings=tuple(warnings),
    )


def load_nvidia_plugin_config(path: Path) -> NvidiaPluginConfig:
    """Read and parse ``path``; a missing or unreadable file is a ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), ("file does not exist",)) from None
    except (PermissionError, IsADirectoryError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), (f"cannot read: {exc}",)) from None
    return parse_nvidia_plugin_config(text, str(path))


def merge_nvidia_plugin_config(
    config: Config, plugin: NvidiaPluginConfig
) -> tuple[Config, tuple[str, ...]]:
    """``config`` with the NVIDIA file's settings applied, and a warning per overridden value.

    The rule, key by key: **a value the NVIDIA file sets wins; a value it leaves out keeps what
    gpud.yaml says (or gpud's default).** ``sharing`` counts as one value: when the NVIDIA file
    has a ``sharing`` section it replaces gpud.yaml's ``sharing`` whole, so one file always holds
    the complete sharing setup. Nothing is an error, because the operator pointed gpud at the
    file precisely to use it; but where gpud.yaml sets a key explicitly to something else, a
    warning names both, so the override is never silent.
    """
    warnings: list[str] = []
    dp = config.device_plugin
    updates = plugin.device_plugin_settings()
    for field, value in updates.items():
        current = getattr(dp, field)
        if field in dp.model_fields_set and current != value:
            warnings.append(
                f"devicePlugin.{DevicePlugin.model_fields[field].alias}: gpud.yaml's "
                f"{_show(current)} is overridden by {plugin.source}'s {_NVIDIA_KEYS[field]} "
                f"{_show(value)}"
            )
    merged_dp = dp.model_copy(update=updates)

    sharing = config.sharing
    if plugin.sharing is not None:
        if "sharing" in config.model_fields_set and config.sharing != plugin.sharing:
            warnings.append(f"sharing: gpud.yaml's sharing is replaced by {plugin.source}'s")
        sharing = plugin.sharing
    merged = config.model_copy(update={"device_plugin": merged_dp, "sharing": sharing})
    return merged, tuple(warnings)


def apply_config_file(config: Config) -> tuple[Config, tuple[str, ...]]:
    """Load ``devicePlugin.configFile`` if set and merge it; returns the config and all warnings
    (ignored keys first, then overrides). Raises ConfigError for a bad file."""
    path = config.device_plugin.config_file
    if path is None:
        return config, ()
    plugin = load_nvidia_plugin_config(path)
    merged, overridden = merge_nvidia_plugin_config(config, plugin)
    return merged, plugin.warnings + overridden


def _show(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if hasattr(value, "value"):
        return repr(value.value)
    return repr(value)
