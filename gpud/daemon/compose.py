"""The node agent as ``gpud run`` starts it: the daemon and the publishers a node serves.

The one place that knows both sides of the seam. The daemon knows its publishers only as
:class:`gpud.node.hub.Publisher`; the publishers know the daemon only as the snapshots they are
handed and the request door. A new audience (metrics, labels, the Kubernetes API) is added here.
"""

from __future__ import annotations

from pathlib import Path

from gpud.config.models import AllocationMode
from gpud.daemon.api import ControlApi
from gpud.daemon.daemon import Daemon
from gpud.daemon.settings import Settings
from gpud.deviceplugin.publisher import KubeletPublisher
from gpud.dra import switch
from gpud.host import cdi
from gpud.hw.backend import Backend
from gpud.kube.publisher import KubernetesPublisher
from gpud.labels.publisher import LabelsPublisher
from gpud.metrics.address import parse_listen
from gpud.metrics.publisher import MetricsPublisher


def compose(settings: Settings, backend: Backend, *, cdi_spec: Path = cdi.DEFAULT_OUTPUT) -> Daemon:
    """The daemon with the control API (started first; another gpud on its socket stops this
    one), kubelet's device plugins (awaited by every reconcile pass), the node labels (whose
    control API answer, ``gpudctl labels``, is what the labels publisher last published),
    unless disabled, Prometheus' ``/metrics``, and the link to the Kubernetes API."""
    daemon = Daemon(settings, backend, cdi_spec=cdi_spec)
    paths = settings.config.paths
    labels = LabelsPublisher()
    api = ControlApi(paths.socket, paths.socket_group, backend, labels=lambda: labels.published)
    daemon.publishers.add(api, required=True)
    # One kubelet API for the node's GPUs, chosen at start (allocation.mode); each removes the
    # other's stale sockets before it advertises (gpud.dra.switch).
    if settings.config.allocation.mode is AllocationMode.DRA:
        from gpud.dra.plugin import DraPublisher

        daemon.publishers.add(DraPublisher(settings.kubelet_root))
    else:
        stale = switch.dra_sockets(settings.kubelet_root, settings.config.dra.driver_name)
        daemon.publishers.add(KubeletPublisher(settings.kubelet_dir, stale), awaited=True)
    daemon.publishers.add(labels)
    metrics = settings.config.metrics
    if metrics.enabled:
        # Required: an address that cannot be bound stops gpud's start with a message naming it,
        # rather than leaving Prometheus with nothing to scrape behind a running daemon.
        publisher = MetricsPublisher(parse_listen(metrics.listen), backend)
        daemon.publishers.add(publisher, required=True)
    # Labels on gpud's own Node through the API server, with the kubelet's credentials.
    daemon.publishers.add(KubernetesPublisher())
    return daemon
