from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Gpu(_message.Message):
    __slots__ = ("index", "uuid", "name", "pci_bus_id", "pci_device_id", "memory_mib", "minor_number", "numa_node", "health", "health_reason", "mig_mode", "nvlink_peers")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    PCI_DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    MINOR_NUMBER_FIELD_NUMBER: _ClassVar[int]
    NUMA_NODE_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    HEALTH_REASON_FIELD_NUMBER: _ClassVar[int]
    MIG_MODE_FIELD_NUMBER: _ClassVar[int]
    NVLINK_PEERS_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    name: str
    pci_bus_id: str
    pci_device_id: str
    memory_mib: int
    minor_number: int
    numa_node: int
    health: str
    health_reason: str
    mig_mode: str
    nvlink_peers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., name: _Optional[str] = ..., pci_bus_id: _Optional[str] = ..., pci_device_id: _Optional[str] = ..., memory_mib: _Optional[int] = ..., minor_number: _Optional[int] = ..., numa_node: _Optional[int] = ..., health: _Optional[str] = ..., health_reason: _Optional[str] = ..., mig_mode: _Optional[str] = ..., nvlink_peers: _Optional[_Iterable[str]] = ...) -> None: ...

class Plugin(_message.Message):
    __slots__ = ("resource", "socket", "registered", "devices", "healthy", "error")
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    SOCKET_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    resource: str
    socket: str
    registered: bool
    devices: int
    healthy: int
    error: str
    def __init__(self, resource: _Optional[str] = ..., socket: _Optional[str] = ..., registered: _Optional[bool] = ..., devices: _Optional[int] = ..., healthy: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class Publisher(_message.Message):
    __slots__ = ("name", "state", "since_unix", "error", "failures", "retry_at_unix", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    RETRY_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    since_unix: float
    error: str
    failures: int
    retry_at_unix: float
    detail: str
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., since_unix: _Optional[float] = ..., error: _Optional[str] = ..., failures: _Optional[int] = ..., retry_at_unix: _Optional[float] = ..., detail: _Optional[str] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("version", "backend", "driver_version", "cuda_version", "backend_error", "kubelet_dir", "kubelet_connected", "gpus", "plugins", "config_file", "uptime_s", "resource_error", "publishers", "allocation_mode", "dra_driver")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DRIVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CUDA_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_ERROR_FIELD_NUMBER: _ClassVar[int]
    KUBELET_DIR_FIELD_NUMBER: _ClassVar[int]
    KUBELET_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    PLUGINS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FILE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ERROR_FIELD_NUMBER: _ClassVar[int]
    PUBLISHERS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_MODE_FIELD_NUMBER: _ClassVar[int]
    DRA_DRIVER_FIELD_NUMBER: _ClassVar[int]
    version: str
    backend: str
    driver_version: str
    cuda_version: str
    backend_error: str
    kubelet_dir: str
    kubelet_connected: bool
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    plugins: _containers.RepeatedCompositeFieldContainer[Plugin]
    config_file: str
    uptime_s: float
    resource_error: str
    publishers: _containers.RepeatedCompositeFieldContainer[Publisher]
    allocation_mode: str
    dra_driver: str
    def __init__(self, version: _Optional[str] = ..., backend: _Optional[str] = ..., driver_version: _Optional[str] = ..., cuda_version: _Optional[str] = ..., backend_error: _Optional[str] = ..., kubelet_dir: _Optional[str] = ..., kubelet_connected: _Optional[bool] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ..., plugins: _Optional[_Iterable[_Union[Plugin, _Mapping]]] = ..., config_file: _Optional[str] = ..., uptime_s: _Optional[float] = ..., resource_error: _Optional[str] = ..., publishers: _Optional[_Iterable[_Union[Publisher, _Mapping]]] = ..., allocation_mode: _Optional[str] = ..., dra_driver: _Optional[str] = ...) -> None: ...

class SetDeviceHealthyRequest(_message.Message):
    __slots__ = ("uuid",)
    UUID_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    def __init__(self, uuid: _Optional[str] = ...) -> None: ...

class SetDeviceHealthyResponse(_message.Message):
    __slots__ = ("gpu", "message")
    GPU_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    gpu: Gpu
    message: str
    def __init__(self, gpu: _Optional[_Union[Gpu, _Mapping]] = ..., message: _Optional[str] = ...) -> None: ...

class InjectXidRequest(_message.Message):
    __slots__ = ("gpu_index", "xid", "gi_id", "ci_id")
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    XID_FIELD_NUMBER: _ClassVar[int]
    GI_ID_FIELD_NUMBER: _ClassVar[int]
    CI_ID_FIELD_NUMBER: _ClassVar[int]
    gpu_index: int
    xid: int
    gi_id: int
    ci_id: int
    def __init__(self, gpu_index: _Optional[int] = ..., xid: _Optional[int] = ..., gi_id: _Optional[int] = ..., ci_id: _Optional[int] = ...) -> None: ...

class InjectXidResponse(_message.Message):
    __slots__ = ("uuid", "marked_unhealthy")
    UUID_FIELD_NUMBER: _ClassVar[int]
    MARKED_UNHEALTHY_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    marked_unhealthy: bool
    def __init__(self, uuid: _Optional[str] = ..., marked_unhealthy: _Optional[bool] = ...) -> None: ...

class InjectGpuLostRequest(_message.Message):
    __slots__ = ("gpu_index",)
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    gpu_index: int
    def __init__(self, gpu_index: _Optional[int] = ...) -> None: ...

class InjectGpuLostResponse(_message.Message):
    __slots__ = ("uuid",)
    UUID_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    def __init__(self, uuid: _Optional[str] = ...) -> None: ...

class ReloadConfigRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadConfigResponse(_message.Message):
    __slots__ = ("config_file",)
    CONFIG_FILE_FIELD_NUMBER: _ClassVar[int]
    config_file: str
    def __init__(self, config_file: _Optional[str] = ...) -> None: ...

class MigStep(_message.Message):
    __slots__ = ("action", "gpu", "detail", "profile", "placement", "gi_id", "ci_id")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    GI_ID_FIELD_NUMBER: _ClassVar[int]
    CI_ID_FIELD_NUMBER: _ClassVar[int]
    action: str
    gpu: int
    detail: str
    profile: str
    placement: str
    gi_id: int
    ci_id: int
    def __init__(self, action: _Optional[str] = ..., gpu: _Optional[int] = ..., detail: _Optional[str] = ..., profile: _Optional[str] = ..., placement: _Optional[str] = ..., gi_id: _Optional[int] = ..., ci_id: _Optional[int] = ...) -> None: ...

class ApplyMigLayoutRequest(_message.Message):
    __slots__ = ("config_name", "config_yaml", "config_source", "dry_run", "force")
    CONFIG_NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    CONFIG_SOURCE_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    config_name: str
    config_yaml: str
    config_source: str
    dry_run: bool
    force: bool
    def __init__(self, config_name: _Optional[str] = ..., config_yaml: _Optional[str] = ..., config_source: _Optional[str] = ..., dry_run: _Optional[bool] = ..., force: _Optional[bool] = ...) -> None: ...

class ApplyMigLayoutResponse(_message.Message):
    __slots__ = ("result", "mutations", "plan", "message", "error_kind", "in_use_by")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    MUTATIONS_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_KIND_FIELD_NUMBER: _ClassVar[int]
    IN_USE_BY_FIELD_NUMBER: _ClassVar[int]
    result: str
    mutations: int
    plan: _containers.RepeatedCompositeFieldContainer[MigStep]
    message: str
    error_kind: str
    in_use_by: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, result: _Optional[str] = ..., mutations: _Optional[int] = ..., plan: _Optional[_Iterable[_Union[MigStep, _Mapping]]] = ..., message: _Optional[str] = ..., error_kind: _Optional[str] = ..., in_use_by: _Optional[_Iterable[str]] = ...) -> None: ...

class GetMigStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MigInstance(_message.Message):
    __slots__ = ("gi_id", "ci_id", "profile", "placement", "mig_uuid")
    GI_ID_FIELD_NUMBER: _ClassVar[int]
    CI_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    MIG_UUID_FIELD_NUMBER: _ClassVar[int]
    gi_id: int
    ci_id: int
    profile: str
    placement: str
    mig_uuid: str
    def __init__(self, gi_id: _Optional[int] = ..., ci_id: _Optional[int] = ..., profile: _Optional[str] = ..., placement: _Optional[str] = ..., mig_uuid: _Optional[str] = ...) -> None: ...

class MigGpu(_message.Message):
    __slots__ = ("index", "uuid", "name", "mode", "instances")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    name: str
    mode: str
    instances: _containers.RepeatedCompositeFieldContainer[MigInstance]
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., name: _Optional[str] = ..., mode: _Optional[str] = ..., instances: _Optional[_Iterable[_Union[MigInstance, _Mapping]]] = ...) -> None: ...

class MigStateResponse(_message.Message):
    __slots__ = ("gpus", "selected_config", "selected_source", "export_yaml", "last_apply", "last_error", "mig_strategy", "lock_longest_held_s", "lock_longest_held_by", "selected_origin", "label")
    GPUS_FIELD_NUMBER: _ClassVar[int]
    SELECTED_CONFIG_FIELD_NUMBER: _ClassVar[int]
    SELECTED_SOURCE_FIELD_NUMBER: _ClassVar[int]
    EXPORT_YAML_FIELD_NUMBER: _ClassVar[int]
    LAST_APPLY_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    MIG_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    LOCK_LONGEST_HELD_S_FIELD_NUMBER: _ClassVar[int]
    LOCK_LONGEST_HELD_BY_FIELD_NUMBER: _ClassVar[int]
    SELECTED_ORIGIN_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    gpus: _containers.RepeatedCompositeFieldContainer[MigGpu]
    selected_config: str
    selected_source: str
    export_yaml: str
    last_apply: str
    last_error: str
    mig_strategy: str
    lock_longest_held_s: float
    lock_longest_held_by: str
    selected_origin: str
    label: str
    def __init__(self, gpus: _Optional[_Iterable[_Union[MigGpu, _Mapping]]] = ..., selected_config: _Optional[str] = ..., selected_source: _Optional[str] = ..., export_yaml: _Optional[str] = ..., last_apply: _Optional[str] = ..., last_error: _Optional[str] = ..., mig_strategy: _Optional[str] = ..., lock_longest_held_s: _Optional[float] = ..., lock_longest_held_by: _Optional[str] = ..., selected_origin: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class AssertMigLayoutRequest(_message.Message):
    __slots__ = ("config_name", "config_yaml", "config_source")
    CONFIG_NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    CONFIG_SOURCE_FIELD_NUMBER: _ClassVar[int]
    config_name: str
    config_yaml: str
    config_source: str
    def __init__(self, config_name: _Optional[str] = ..., config_yaml: _Optional[str] = ..., config_source: _Optional[str] = ...) -> None: ...

class AssertMigLayoutResponse(_message.Message):
    __slots__ = ("applied", "differences")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    DIFFERENCES_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    differences: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, applied: _Optional[bool] = ..., differences: _Optional[_Iterable[str]] = ...) -> None: ...

class InjectProcessRequest(_message.Message):
    __slots__ = ("gpu_index", "pid", "mig_uuid", "remove")
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    MIG_UUID_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    gpu_index: int
    pid: int
    mig_uuid: str
    remove: bool
    def __init__(self, gpu_index: _Optional[int] = ..., pid: _Optional[int] = ..., mig_uuid: _Optional[str] = ..., remove: _Optional[bool] = ...) -> None: ...

class InjectProcessResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetLoadRequest(_message.Message):
    __slots__ = ("gpu_index", "gi_id", "utilization_pct", "memory_used_mib", "automatic")
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    GI_ID_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PCT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_MIB_FIELD_NUMBER: _ClassVar[int]
    AUTOMATIC_FIELD_NUMBER: _ClassVar[int]
    gpu_index: int
    gi_id: int
    utilization_pct: float
    memory_used_mib: int
    automatic: bool
    def __init__(self, gpu_index: _Optional[int] = ..., gi_id: _Optional[int] = ..., utilization_pct: _Optional[float] = ..., memory_used_mib: _Optional[int] = ..., automatic: _Optional[bool] = ...) -> None: ...

class SetLoadResponse(_message.Message):
    __slots__ = ("uuid", "load")
    UUID_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    load: str
    def __init__(self, uuid: _Optional[str] = ..., load: _Optional[str] = ...) -> None: ...

class ReadDevicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PodHolder(_message.Message):
    __slots__ = ("namespace", "pod", "container")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    pod: str
    container: str
    def __init__(self, namespace: _Optional[str] = ..., pod: _Optional[str] = ..., container: _Optional[str] = ...) -> None: ...

class DeviceReading(_message.Message):
    __slots__ = ("gpu", "uuid", "mig_uuid", "profile", "gi_id", "name", "utilization_pct", "memory_used_mib", "memory_total_mib", "temperature_c", "power_w", "health", "health_reason", "pods")
    GPU_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    MIG_UUID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    GI_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PCT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_MIB_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_MIB_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    POWER_W_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    HEALTH_REASON_FIELD_NUMBER: _ClassVar[int]
    PODS_FIELD_NUMBER: _ClassVar[int]
    gpu: int
    uuid: str
    mig_uuid: str
    profile: str
    gi_id: int
    name: str
    utilization_pct: float
    memory_used_mib: int
    memory_total_mib: int
    temperature_c: int
    power_w: float
    health: str
    health_reason: str
    pods: _containers.RepeatedCompositeFieldContainer[PodHolder]
    def __init__(self, gpu: _Optional[int] = ..., uuid: _Optional[str] = ..., mig_uuid: _Optional[str] = ..., profile: _Optional[str] = ..., gi_id: _Optional[int] = ..., name: _Optional[str] = ..., utilization_pct: _Optional[float] = ..., memory_used_mib: _Optional[int] = ..., memory_total_mib: _Optional[int] = ..., temperature_c: _Optional[int] = ..., power_w: _Optional[float] = ..., health: _Optional[str] = ..., health_reason: _Optional[str] = ..., pods: _Optional[_Iterable[_Union[PodHolder, _Mapping]]] = ...) -> None: ...

class DevicesReading(_message.Message):
    __slots__ = ("devices", "pods_error", "backend_error")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    PODS_ERROR_FIELD_NUMBER: _ClassVar[int]
    BACKEND_ERROR_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceReading]
    pods_error: str
    backend_error: str
    def __init__(self, devices: _Optional[_Iterable[_Union[DeviceReading, _Mapping]]] = ..., pods_error: _Optional[str] = ..., backend_error: _Optional[str] = ...) -> None: ...

class GetLabelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetLabelsResponse(_message.Message):
    __slots__ = ("labels", "nfd_file", "detail")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LABELS_FIELD_NUMBER: _ClassVar[int]
    NFD_FILE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.ScalarMap[str, str]
    nfd_file: str
    detail: str
    def __init__(self, labels: _Optional[_Mapping[str, str]] = ..., nfd_file: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...
