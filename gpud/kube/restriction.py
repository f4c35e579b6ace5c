"""Which label names a kubelet credential may change on its own Node (NodeRestriction).

The API server's NodeRestriction admission plugin refuses a node identity any change to a label
in ``kubernetes.io``, ``k8s.io`` or a subdomain of either, unless it is a kubelet label: the
``kubelet.kubernetes.io`` and ``node.kubernetes.io`` namespaces and their subdomains, and a few
exact keys (hostname, os, arch, instance type, zone, region); ``node-restriction.kubernetes.io``
is refused always (shared/reference/cluster-integration.md §5.3). One refused key fails the
whole request, so gpud leaves such a label out and says so instead of losing every label.

Checked against a real kube-apiserver in tests/test_kube_link.py. Note that
``feature.node.kubernetes.io/…`` lies inside ``node.kubernetes.io`` and is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping

_RESTRICTED = ("kubernetes.io", "k8s.io")
_KUBELET_NAMESPACES = ("kubelet.kubernetes.io", "node.kubernetes.io")
_KUBELET_KEYS = frozenset(
    {
        "kubernetes.io/hostname",
        "kubernetes.io/os",
        "kubernetes.io/arch",
        "beta.kubernetes.io/os",
        "beta.kubernetes.io/arch",
        "beta.kubernetes.io/instance-type",
        "node.kubernetes.io/instance-type",
        "topology.kubernetes.io/zone",
        "topology.kubernetes.io/region",
        "failure-domain.beta.kubernetes.io/zone",
        "failure-domain.beta.kubernetes.io/region",
    }
)
_NEVER = "node-restriction.kubernetes.io"


def _in(domain: str, parent: str) -> bool:
    return domain == parent or domain.endswith("." + parent)


def forbidden_to_kubelet(key: str) -> str:
    """Why NodeRestriction refuses a node identity a change of label ``key``; "" if it allows."""
    prefix = key.rpartition("/")[0]
    if _in(prefix, _NEVER):
        return f"the {_NEVER} namespace is only for administrators"
    if key in _KUBELET_KEYS or not any(_in(prefix, r) for r in _RESTRICTED):
        return ""
    if any(_in(prefix, n) for n in _KUBELET_NAMESPACES):
        return ""
    return (
        f"a kubelet credential may not set {prefix} labels (NodeRestriction allows of "
        "kubernetes.io and k8s.io only kubelet.kubernetes.io, node.kubernetes.io and the "
        "kubelet's own keys)"
    )


def kubelet_allowed(labels: Mapping[str, str]) -> tuple[dict[str, str], tuple[str, ...]]:
    """The labels a kubelet credential may apply, and one warning per label left out."""
    allowed: dict[str, str] = {}
    warnings: list[str] = []
    for key, value in sorted(labels.items()):
        why = forbidden_to_kubelet(key)
        if why:
            warnings.append(f"label {key} is not sent to the API server: {why}")
        else:
            allowed[key] = value
    return allowed, tuple(warnings)
