"""The daemon's effective settings: the config file with the command line laid over it.

Flags win over the file, as with NVIDIA's tools. The same overrides are re-applied on every
reload, so ``systemctl reload gpud`` never undoes a ``--kubelet-dir`` given at start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpud.config import kubelet
from gpud.config.load import DEFAULT_CONFIG_PATH, load
from gpud.config.models import BackendKind, Config
from gpud.config.nvidia_plugin import apply_config_file


@dataclass(frozen=True)
class Overrides:
    """What the command line said; None means "as the file (or its default) says"."""

    simulate: str | None = None
    backend: BackendKind | None = None
    kubelet_dir: Path | None = None
    state_dir: Path | None = None
    socket: Path | None = None
    log_level: str | None = None
    nfd_dir: Path | None = None
    metrics_listen: str | None = None
    kubeconfig: Path | None = None
    node_name: str | None = None

    def apply(self, cfg: Config) -> Config:
        paths = {
            k: v
            for k, v in (
                ("kubelet_dir", self.kubelet_dir),
                ("state_dir", self.state_dir),
                ("socket", self.socket),
            )
            if v is not None
        }
        top: dict[str, object] = {"paths": cfg.paths.model_copy(update=paths)}
        if self.simulate is not None:
            top["simulate"] = self.simulate
            top["backend"] = BackendKind.SIM
        if self.backend is not None:
            top["backend"] = self.backend
        if self.log_level is not None:
            top["log"] = cfg.log.model_copy(update={"level": self.log_level})
        if self.nfd_dir is not None:
            nfd = cfg.labels.nfd.model_copy(update={"directory": self.nfd_dir})
            top["labels"] = cfg.labels.model_copy(update={"nfd": nfd})
        if self.metrics_listen is not None:
            top["metrics"] = cfg.metrics.model_copy(update={"listen": self.metrics_listen})
        kube = {
            k: v for k, v in (("kubeconfig", self.kubeconfig), ("node_name", self.node_name)) if v
        }
        if kube:
            top["kubernetes"] = cfg.kubernetes.model_validate(cfg.kubernetes.model_dump() | kube)
        return cfg.model_copy(update=top)


@dataclass(frozen=True)
class Settings:
    config: Config
    # The file the config came from; None when no file exists and defaults apply.
    config_file: Path | None
    kubelet_dir: Path
    kubelet_reason: str
    # kubelet's root directory (DRA's plugins_registry and plugins/ are below it): the parent
    # of a configured device-plugin directory, which kubelet keeps at <root>/device-plugins.
    kubelet_root: Path
    pod_resources_socket: Path
    # What the daemon should log once: keys of an NVIDIA plugin config that gpud ignores, etc.
    warnings: tuple[str, ...]
    reload: Callable[[], Settings]


def resolve(config_file: Path | None, overrides: Overrides) -> Settings:
    """Load, override and complete the configuration; raises ConfigError for a bad file."""
    cfg, warnings = apply_config_file(overrides.apply(load(config_file)))
    source = config_file
    if source is None and DEFAULT_CONFIG_PATH.exists():
        source = DEFAULT_CONFIG_PATH
    found = kubelet.detect()
    kubelet_dir, reason, root = found.device_plugin_dir, found.reason, found.root
    if cfg.paths.kubelet_dir is not None:
        kubelet_dir, reason = cfg.paths.kubelet_dir, "configured"
        root = kubelet_dir.parent
    return Settings(
        config=cfg,
        config_file=source,
        kubelet_dir=kubelet_dir,
        kubelet_reason=reason,
        kubelet_root=root,
        pod_resources_socket=cfg.paths.pod_resources_socket or found.pod_resources_socket,
        warnings=warnings,
        reload=lambda: resolve(config_file, overrides),
    )
