"""The schema of ``/etc/gpud/gpud.yaml`` (``version: v1``).

Keys are camelCase like the NVIDIA device plugin's config, so operators moving from it meet the same
spelling (``deviceListStrategy``, ``sharing.timeSlicing``). Unknown keys are errors: a typo in a
health setting must not silently fall back to a default.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from gpud.labels.names import static_key_problem, value_problem
from gpud.metrics.address import parse_listen

# A Node's name: a DNS-1123 subdomain.
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_NODE_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")

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


class MigStrategy(str, enum.Enum):
    """How MIG devices are advertised, with the NVIDIA device plugin's meanings.

    ``none``: every GPU is ``nvidia.com/gpu``, MIG devices are not advertised. ``single``: every
    MIG device is ``nvidia.com/gpu`` (all GPUs must have MIG on, with one profile). ``mixed``: one
    ``nvidia.com/mig-<profile>`` resource per profile beside ``nvidia.com/gpu`` for the rest.
    """

    NONE = "none"
    SINGLE = "single"
    MIXED = "mixed"


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
    # mixed, unlike NVIDIA's plugin (none): under none a MIG-enabled GPU is advertised whole,
    # which no container can use; on a node without MIG, mixed and none advertise the same.
    mig_strategy: MigStrategy = MigStrategy.MIXED
    # An NVIDIA k8s-device-plugin config file (version v1) whose flags and sharing gpud adopts;
    # see gpud.config.nvidia_plugin for which keys are used and how they combine with this file.
    config_file: Path | None = None

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


RESOURCE_PREFIX = "nvidia.com"
# Kubernetes' limit for an extended resource name, which NVIDIA's plugin applies to the whole
# "nvidia.com/<name>" string.
MAX_RESOURCE_NAME_LENGTH = 63
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)


def qualify_resource_name(name: str) -> str:
    """``nvidia.com/<name>`` for ``name`` with or without the prefix, as NVIDIA's plugin reads it.

    Raises ValueError when the result is not a resource name kubelet would accept from gpud.
    """
    prefix = f"{RESOURCE_PREFIX}/"
    full = name if name.startswith(prefix) else prefix + name
    short = full[len(prefix) :]
    if "/" in short:
        raise ValueError(f"only {RESOURCE_PREFIX} resources can be shared, got {name!r}")
    if len(full) > MAX_RESOURCE_NAME_LENGTH:
        raise ValueError(
            f"fully-qualified resource name must be {MAX_RESOURCE_NAME_LENGTH} characters or "
            f"less, {full!r} has {len(full)}"
        )
    if not _DNS1123_SUBDOMAIN.match(short):
        raise ValueError(
            f"resource name {full!r} is not valid: after '{prefix}' use lower-case letters, "
            "digits, '-' and '.', starting and ending with a letter or digit"
        )
    return full


class ReplicatedResource(_Strict):
    """One ``sharing.timeSlicing.resources`` entry: every device of ``name`` becomes ``replicas``.

    ``devices`` exists for compatibility with NVIDIA's schema; only ``all`` (its default) is
    accepted, because replicating some GPUs of a resource and not others would give one resource
    name two meanings.
    """

    name: str
    rename: str | None = None
    replicas: int = Field(ge=2)
    devices: Literal["all"] = "all"

    @field_validator("name", "rename")
    @classmethod
    def _qualified(cls, value: str | None) -> str | None:
        return None if value is None else qualify_resource_name(value)

    @field_validator("devices", mode="before")
    @classmethod
    def _all_only(cls, value: object) -> object:
        if value != "all":
            raise ValueError(
                f"only 'all' is supported by gpud, got {value!r}: sharing some devices of a "
                "resource (a count, indices or UUIDs) is not supported; remove 'devices'"
            )
        return value

    def advertised_name(self, rename_by_default: bool) -> str:
        """The resource the replicas are served as: ``rename``, else ``<name>.shared`` when
        ``renameByDefault``, else ``name`` itself."""
        if self.rename is not None:
            return self.rename
        return f"{self.name}.shared" if rename_by_default else self.name


class TimeSlicing(_Strict):
    """``sharing.timeSlicing``: the NVIDIA device plugin's ``ReplicatedResources``."""

    rename_by_default: bool = False
    # A container may take at most one replica (two replicas of one GPU are not twice the GPU).
    fail_requests_greater_than_one: bool = False
    resources: list[ReplicatedResource] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> TimeSlicing:
        names = [r.name for r in self.resources]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"resources listed more than once: {', '.join(twice)}")
        targets = [r.advertised_name(self.rename_by_default) for r in self.resources]
        clash = sorted({t for t in targets if targets.count(t) > 1})
        if clash:
            raise ValueError(f"several resources would be advertised as {', '.join(clash)}")
        return self


class Sharing(_Strict):
    """``sharing``: how devices are shared between containers. Time-slicing only."""

    time_slicing: TimeSlicing | None = None
    # Present only so that its presence can be refused with a clear message.
    mps: None = None

    @field_validator("mps", mode="before")
    @classmethod
    def _no_mps(cls, value: object) -> object:
        if value is not None:
            raise ValueError(
                "MPS sharing is not supported by gpud; use sharing.timeSlicing or remove "
                "sharing.mps"
            )
        return value


class MigByLabel(_Strict):
    """``mig.byLabel``: the Node label ``nvidia.com/mig.config`` chooses the layout, as the GPU
    Operator's mig-manager reads it (docs/cluster.md). Needs the API link (``kubernetes``)."""

    enabled: bool = True
    # Seconds an apply waits for pods holding MIG devices the new layout destroys to leave,
    # before it fails naming them (mig-manager waits 5 minutes for its own pods).
    wait_for_pods: int = Field(default=300, ge=0, le=86400)


class Mig(_Strict):
    """Where MIG layouts come from and which one a fresh node starts with."""

    # A mig-parted config file (version v1, mig-configs); gpud's bundled layouts when unset.
    config_file: Path | None = None
    # Layout applied at start while no layout has been selected with `gpudctl mig apply` (the
    # selection, kept in the state directory, wins from then on).
    layout: str | None = None
    by_label: MigByLabel = Field(default_factory=MigByLabel)


def _static_label_name(name: str) -> str:
    problem = static_key_problem(name)
    if problem:
        raise ValueError(f"label name {name!r}: {problem}")
    return name


def _static_label_value(value: object) -> object:
    # YAML reads true, 3 and 1.10 as other types; a label value is a string. Booleans and
    # integers read back unambiguously, a float may not (1.10 is 1.1): that one must be quoted.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"write the value as a string in quotes (YAML read {value!r})")
    problem = value_problem(value)
    if problem:
        raise ValueError(f"label value {value!r}: {problem}")
    return value


StaticLabelName = Annotated[str, AfterValidator(_static_label_name)]
StaticLabelValue = Annotated[str, BeforeValidator(_static_label_value)]


class Nfd(_Strict):
    """``labels.nfd``: the NFD local feature file gpud publishes the labels in."""

    # nfd-worker's features.d, which it reads from this fixed path; another one only where NFD's
    # worker has the host directory mounted elsewhere.
    directory: Path = Path("/etc/kubernetes/node-feature-discovery/features.d")
    # Create the directory when it does not exist and write anyway (NFD installed later). Unset,
    # a node without NFD gets no file.
    force: bool = False


class Labels(_Strict):
    """``labels``: the node labels gpud publishes (GPU Feature Discovery's, and static ones)."""

    enabled: bool = True
    # Published as they are, beside GFD's labels, e.g. {accelerator: nvidia}.
    static: dict[StaticLabelName, StaticLabelValue] = Field(default_factory=dict)
    nfd: Nfd = Field(default_factory=Nfd)


class AllocationMode(str, enum.Enum):
    """Which kubelet API hands this node's GPUs to pods: never both for the same GPUs."""

    DEVICE_PLUGIN = "device-plugin"
    DRA = "dra"


class Allocation(_Strict):
    """``allocation``: how pods get GPUs (docs/dra.md)."""

    mode: AllocationMode = AllocationMode.DEVICE_PLUGIN


_DRIVER_NAME = re.compile(rf"(?=.{{1,63}}$){_LABEL}(\.{_LABEL})+")


class Dra(_Strict):
    """``dra``: gpud as the node's Dynamic Resource Allocation driver (``allocation.mode: dra``)."""

    # The DRA driver name in ResourceSlices and DeviceClasses; NVIDIA's by default, so claims
    # and DeviceClasses written for NVIDIA's driver select gpud's devices unchanged.
    driver_name: str = "gpu.nvidia.com"
    # Where Prepare writes each claim's CDI spec; the container runtime must read this directory
    # (containerd and CRI-O read /etc/cdi and /var/run/cdi by default).
    cdi_dir: Path = Path("/var/run/cdi")

    @field_validator("driver_name")
    @classmethod
    def _driver_name(cls, value: str) -> str:
        if not _DRIVER_NAME.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a DRA driver name (a DNS subdomain with at least one dot, "
                "lower-case, at most 63 characters, e.g. gpu.nvidia.com)"
            )
        return value


class Kubernetes(_Strict):
    """``kubernetes``: gpud's own link to the API server (labels on its Node), with the kubelet's
    credentials unless told otherwise. See docs/cluster.md."""

    # None: on when a kubeconfig is found (this key, else the kubelet's own), off without a word
    # otherwise. true: missing credentials are an error shown in status. false: off.
    enabled: bool | None = None
    # A kubeconfig file; unset: the kubelet's (kubeadm, MicroK8s, k3s). `gpud run --kubeconfig`.
    kubeconfig: Path | None = None
    # This node's Node name; unset: the kubelet credential's (system:node:<name>), else the
    # hostname. `gpud run --node-name`.
    node_name: str | None = None

    @field_validator("node_name")
    @classmethod
    def _node_name(cls, value: str | None) -> str | None:
        if value is not None and not _NODE_NAME.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a Node name (lower-case letters, digits, '-' and '.', "
                "at most 253 characters)"
            )
        return value


class Toolkit(_Strict):
    """Where ``gpudctl toolkit install`` gets nvidia-container-toolkit when apt does not know it.

    Unset (the default), gpud adds no apt source: which repository a node trusts is the
    operator's decision, and a mirror or an internal repository is common on GPU clusters.
    """

    # A one-line-style apt source ("deb [signed-by=…] URL SUITE") or a bare repository URL,
    # written to /etc/apt/sources.list.d/nvidia-container-toolkit.list.
    apt_source: str | None = None
    # The keyring that signs that repository; written as signed-by=<keyring>.
    keyring: Path | None = None
    # Whether gpud bootstrap makes nvidia containerd's default runtime. Unset: only when no
    # device-list strategy is a CDI one (NVIDIA_VISIBLE_DEVICES needs the nvidia runtime; with
    # CDI, NVIDIA's device plugin docs require it not to be the default).
    set_as_default: bool | None = None

    @field_validator("apt_source")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        if value is not None and ("\n" in value.strip() or not value.strip()):
            raise ValueError("must be one non-empty line (a deb line or a repository URL)")
        return value.strip() if value is not None else None


class Driver(_Strict):
    """Which NVIDIA driver ``gpud bootstrap`` installs (``gpudctl driver install``'s --branch)."""

    # "550", "550-server", "550-server-open"; unset: the newest server branch ubuntu-drivers lists.
    branch: str | None = None
    # Let ubuntu-drivers build the modules with DKMS (--include-dkms): needed on kernels for which
    # Canonical ships no prebuilt modules; under Secure Boot, DKMS's key must then be enrolled.
    include_dkms: bool = False

    @field_validator("branch")
    @classmethod
    def _branch_shape(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from gpud.host.driver_install import parse_wanted

        parse_wanted(value)  # ValueError with the accepted forms
        return value.strip()


class Apt(_Strict):
    """How gpud's apt and ubuntu-drivers runs (bootstrap, ``gpudctl toolkit install``) treat the
    dpkg lock that unattended-upgrades holds on a new node."""

    # Seconds each command waits for the dpkg/apt locks before it fails, naming their holder.
    lock_timeout: int = Field(default=600, ge=0)


class Log(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"


def _listen_address(value: str) -> str:
    parse_listen(value)
    return value


class Metrics(_Strict):
    """``metrics``: Prometheus' ``/metrics`` under dcgm-exporter's names (docs/metrics.md)."""

    enabled: bool = True
    # dcgm-exporter's --address spelling: ":9400" is every address, "127.0.0.1:9400" one.
    listen: Annotated[str, AfterValidator(_listen_address)] = ":9400"


class Config(_Strict):
    version: Literal["v1"]
    backend: BackendKind = BackendKind.AUTO
    # Simulated machine, used when backend is sim (or auto with no driver and simulate set).
    simulate: str | None = None
    paths: Paths = Field(default_factory=Paths)
    device_plugin: DevicePlugin = Field(default_factory=DevicePlugin, alias="devicePlugin")
    health: Health = Field(default_factory=Health)
    sharing: Sharing = Field(default_factory=Sharing)
    mig: Mig = Field(default_factory=Mig)
    allocation: Allocation = Field(default_factory=Allocation)
    dra: Dra = Field(default_factory=Dra)
    labels: Labels = Field(default_factory=Labels)
    kubernetes: Kubernetes = Field(default_factory=Kubernetes)
    toolkit: Toolkit = Field(default_factory=Toolkit)
    driver: Driver = Field(default_factory=Driver)
    apt: Apt = Field(default_factory=Apt)
    log: Log = Field(default_factory=Log)
    metrics: Metrics = Field(default_factory=Metrics)


def default_config() -> Config:
    return Config(version="v1")
