"""Which node label names and values Kubernetes and NFD accept, and which names gpud computes.

Checked twice: when gpud.yaml's static labels are loaded (a bad one is a config error naming it)
and when the feature file is rendered (a computed value NFD would refuse, such as an over-long
machine name, is left out with the reason instead of being dropped by nfd-master without a word).
Facts: Kubernetes' qualified-name and label-value rules, and nfd-master's namespace rules
(shared/reference/cluster-integration.md §3).
"""

from __future__ import annotations

import re

MAX_NAME_LENGTH = 63
MAX_PREFIX_LENGTH = 253
MAX_VALUE_LENGTH = 63

# Name part of a key, and a value: alphanumeric at both ends, "-", "_" and "." inside.
_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
# A DNS-1123 subdomain: lower-case labels joined by dots.
_PREFIX = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

# nfd-master refuses kubernetes.io and its subdomains except these two and their subdomains.
_KUBERNETES_IO = "kubernetes.io"
_NFD_ALLOWED = ("feature.node.kubernetes.io", "profile.node.kubernetes.io")
# nfd-master puts keys without a namespace into this one (unless its DisableAutoPrefix gate is on).
NFD_DEFAULT_NAMESPACE = "feature.node.kubernetes.io"

# The names GPU Feature Discovery sets, which gpud computes: a static label may not take one, or
# two sources would fight over it. nvidia.com/mig.* also holds nvidia.com/mig.config, the layout
# request an operator sets with kubectl, which a published label would overwrite.
_COMPUTED_PREFIXES = (
    "nvidia.com/cuda.",
    "nvidia.com/gfd.",
    "nvidia.com/mig.",
    "nvidia.com/mig-",
    "nvidia.com/mps.",
    "nvidia.com/vgpu.",
)
_COMPUTED_GPU = (
    "product",
    "count",
    "memory",
    "family",
    "compute.",
    "replicas",
    "sharing-strategy",
    "machine",
    "mode",
    "clique",
    "multiprocessors",
    "slices.",
    "engines.",
)


def _in_domain(domain: str, parent: str) -> bool:
    return domain == parent or domain.endswith("." + parent)


def key_problem(key: str) -> str:
    """Why Kubernetes would refuse ``key`` as a label name, "" when it would not."""
    prefix, slash, name = key.rpartition("/")
    if slash and not prefix:
        return "the prefix before '/' is empty"
    if prefix:
        if len(prefix) > MAX_PREFIX_LENGTH:
            return f"the prefix is longer than {MAX_PREFIX_LENGTH} characters"
        if not _PREFIX.fullmatch(prefix):
            return (
                f"the prefix {prefix!r} is not a DNS subdomain (lower-case letters, digits, '-' "
                "and '.', e.g. example.com)"
            )
    if not name:
        return "the name is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"the name after the prefix is longer than {MAX_NAME_LENGTH} characters"
    if not _NAME.fullmatch(name):
        return (
            f"the name {name!r} must be letters, digits, '-', '_' and '.', starting and ending "
            "with a letter or digit"
        )
    return ""


def value_problem(value: str) -> str:
    """Why Kubernetes would refuse ``value`` as a label value, "" when it would not."""
    if len(value) > MAX_VALUE_LENGTH:
        return f"longer than {MAX_VALUE_LENGTH} characters"
    if not _VALUE.fullmatch(value):
        return (
            "a value must be empty or letters, digits, '-', '_' and '.', starting and ending "
            "with a letter or digit"
        )
    return ""


def nfd_namespace_problem(key: str) -> str:
    """Why nfd-master would refuse ``key``'s namespace by default, "" when it would not."""
    prefix, _, _ = key.rpartition("/")
    if not _in_domain(prefix, _KUBERNETES_IO):
        return ""
    if any(_in_domain(prefix, allowed) for allowed in _NFD_ALLOWED):
        return ""
    return (
        f"nfd-master refuses the namespace {prefix!r}: of kubernetes.io only "
        f"{' and '.join(_NFD_ALLOWED)} (and their subdomains) are allowed"
    )


def computed_by_gpud(key: str) -> bool:
    """Whether ``key`` is one of GPU Feature Discovery's names, which gpud computes."""
    if key.startswith(_COMPUTED_PREFIXES):
        return True
    gpu = "nvidia.com/gpu."
    if not key.startswith(gpu):
        return False
    rest = key[len(gpu) :]
    return any(rest.startswith(c) if c.endswith(".") else rest == c for c in _COMPUTED_GPU)


def static_key_problem(key: str) -> str:
    """Why an operator's static label name cannot be published, "" when it can."""
    problem = key_problem(key) or nfd_namespace_problem(key)
    if problem:
        return problem
    if computed_by_gpud(key):
        return (
            "gpud computes this label (GPU Feature Discovery's nvidia.com/gpu.*, mig.*, mig-*, "
            "cuda.*, ...); choose another name"
        )
    return ""
