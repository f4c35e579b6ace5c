"""The schema of ``/etc/gpud/gpud.yaml`` (``version: v1``).

Keys are camelCase like the NVIDIA device plugin's config, so operators moving from it meet the same
spelling (``deviceListStrategy``, ``sharing.timeSlicing``). Unknown keys are errors: a typo in a
health setting must not silently fall back to a default.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

DEFAULT_IGNORED_XIDS: tuple[int, ...] = (13, 31, 43, 45, 68, 109)
"""XIDs caused by applications, not by the GPU (the NVIDIA device plugin's list)."""


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
    )


class BackendKind(str, enum.Enum):
    AUTO = "auto"
    NVML = "nvml"
    SIM = "sim"


class DeviceListStrategy(str, enum.Enum):
    """How ``Allocate`` tells the runtime which GPUs a container gets."""

    ENVVAR = "envvar"
    CDI_ANNOTATIONS = "cdi-annotations"
    CDI_CRI = "cdi-cri"


class DeviceIDStrategy(str, enum.Enum):
    UUID = "uuid"
    INDEX = "index"


class Paths(_Strict):
    state_dir: Path = Path("/var/lib/gpud")
    socket: Path = Path("/run/gpud/gpud.sock")
    # Group that may read status over the socket (mode 0660); mutating calls still need root.
    socket_group: str = "gpud"
    # kubelet's device-plugin directory; detected when unset (see gpud.config.kubelet).
    kubelet_dir: Path | None = None
    # kubelet's PodResources socket; derived from the detected kubelet root when unset.
    pod_resources_socket: Path | None = None


class DevicePlugin(_Strict):
    device_list_strategy: list[DeviceListStrategy] = Field(
        default_factory=lambda: [DeviceListStrategy.ENVVAR], min_length=1
    )
    device_id_strategy: DeviceIDStrategy = DeviceIDStrategy.UUID
    cdi_annotation_prefix: str = "cdi.k8s.io/"
    # CDI kind of the devices in the spec nvidia-ctk generates: names are "<kind>=<uuid>".
    cdi_kind: str = "nvidia.com/gpu"
    # Add /dev/nvidia* DeviceSpecs to Allocate (for kubelet's static CPU manager).
    pass_device_specs: bool = False

    @field_validator("device_list_strategy", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        # The NVIDIA plugin accepts a single string or a list; so do we.
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("cdi_kind")
    @classmethod
    def _kind_shape(cls, value: str) -> str:
        vendor, sep, klass = value.partition("/")
        if not sep or not vendor or not klass or "=" in value:
            raise ValueError("must look like 'vendor.com/class', e.g. 'nvidia.com/gpu'")
        return value


class Health(_Strict):
    # Replaces the default list when given; extraIgnoredXids adds to whichever list is in force.
    ignored_xids: list[int] = Field(default_factory=lambda: list(DEFAULT_IGNORED_XIDS))
    extra_ignored_xids: list[int] = Field(default_factory=list)
    # Forced critical even when listed above (the plugin's DP_ENABLE_HEALTHCHECKS).
    critical_xids: list[int] = Field(default_factory=list)

    @field_validator("ignored_xids", "extra_ignored_xids", "critical_xids")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        bad = [x for x in value if x <= 0]
        if bad:
            raise ValueError(f"XIDs are positive integers, got {bad}")
        return value


class Log(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Strict):
    version: Literal["v1"]
    backend: BackendKind = BackendKind.AUTO
    # Simulated machine, used when backend is sim (or auto with no driver and simulate set).
    simulate: str | None = None
    paths: Paths = Field(default_factory=Paths)
    device_plugin: DevicePlugin = Field(default_factory=DevicePlugin, alias="devicePlugin")
    health: Health = Field(default_factory=Health)
    log: Log = Field(default_factory=Log)


def default_config() -> Config:
    return Config(version="v1")
