"""The node condition ``GPUHealthy``: whether every GPU and MIG device of the node can take work,
as ``kubectl describe node`` and anything that watches Node conditions (node-problem-detector
style remediation, draino, cluster autoscalers' health checks) read it.

* ``True`` (reason ``GPUsHealthy``): every device is in service. A MIG layout being applied is
  not a fault: the devices it withdraws from kubelet meanwhile are not unhealthy, and the message
  says the change is under way.
* ``False`` (reason ``GPUUnhealthy``): the devices out of service with their UUIDs and reasons
  (a GPU's MIG devices are counted with it, not listed again).
* ``Unknown`` (reason ``GPUDriverUnavailable``): the driver cannot be used, so gpud cannot tell;
  ``Unknown`` (``NoGPUs``) when the driver works but finds no GPU.

Pure: a :class:`~gpud.node.state.NodeState` in, a :class:`GpuCondition` out.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpud.kube.report import clip
from gpud.node.state import NodeState

CONDITION_TYPE = "GPUHealthy"


@dataclass(frozen=True, slots=True)
class GpuCondition:
    status: str
    reason: str
    message: str


def gpu_condition(state: NodeState) -> GpuCondition:
    if state.backend_error:
        message = clip(f"gpud cannot read the GPUs: {state.backend_error}")
        return GpuCondition("Unknown", "GPUDriverUnavailable", message)
    if not state.gpus:
        return GpuCondition("Unknown", "NoGPUs", "the GPU driver works but reports no GPU")
    out = [d for d in state.devices if not d.healthy]
    if out:
        gpus_out = {d.gpu_uuid for d in out if not d.is_mig}
        parts = []
        for device in out:
            if not device.is_mig:
                migs = sum(1 for d in out if d.is_mig and d.gpu_uuid == device.uuid)
                with_migs = f" with its {migs} MIG devices" if migs else ""
                parts.append(f"{device.uuid} (GPU {device.gpu_index}{with_migs}): {device.reason}")
            elif device.gpu_uuid not in gpus_out:
                parts.append(
                    f"{device.uuid} (MIG {device.profile} on GPU {device.gpu_index}): "
                    f"{device.reason}"
                )
        message = f"{len(out)} of {len(state.devices)} devices out of service: " + "; ".join(parts)
        return GpuCondition("False", "GPUUnhealthy", clip(message))
    migs = sum(1 for d in state.devices if d.is_mig)
    count = len(state.gpus)
    message = f"{count} GPU{'' if count == 1 else 's'} healthy"
    message += f", {migs} MIG devices" if migs else ""
    if state.withdrawn:
        indexes = sorted(g.index for g in state.gpus if g.uuid in state.withdrawn)
        message += (
            f"; MIG layout being changed on GPU {', '.join(map(str, indexes))}: their devices "
            "are withdrawn from kubelet until it is done"
        )
    return GpuCondition("True", "GPUsHealthy", message)
