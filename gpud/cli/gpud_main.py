"""``gpud``: runs the daemon in the foreground (systemd runs it the same way).

Only argparse is imported before the command is known; the daemon's imports come after, so
``gpud --help`` is instant and ``gpud run`` pays for exactly what it uses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpud import __version__
from gpud.cli.validate import EXIT_FAILED, EXIT_INVALID, validate_config

DESCRIPTION = """\
gpud makes an NVIDIA GPU node usable by Kubernetes: it advertises the node's GPUs to kubelet as a
device plugin, tracks their health from NVML events, and answers gpudctl on a unix socket.
"""

EPILOG = """\
examples:
  gpud run                                  run with /etc/gpud/gpud.yaml on the real GPUs
  gpud run --simulate dgx-a100 --kubelet-dir /tmp/kubelet --state-dir /tmp/gpud \\
           --socket /tmp/gpud.sock          a simulated 8 x A100 node, no GPU needed
  gpud config validate /etc/gpud/gpud.yaml  check a config file before installing it
  sudo gpud bootstrap                       set up a new node: driver, reboot, toolkit,
                                            containerd, CDI, MIG layout, gpud.service

simulated machines: dgx-a100, dgx-h100, a30x4, l4x2, t4x1, or MODEL:COUNT (e.g. h100-80gb:4)
exit status: 0 success, 1 failure, 2 invalid input (bad flags or config)
"""


def _node_name(value: str) -> str:
    from pydantic import ValidationError

    from gpud.config.models import Kubernetes

    try:
        Kubernetes(node_name=value)
    except ValidationError as exc:
        why = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise argparse.ArgumentTypeError(why) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    """Public so that gpud.cli.completion reads the same parser the command runs."""
    p = argparse.ArgumentParser(
        prog="gpud",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"gpud {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground until SIGTERM")
    run.add_argument("--config", type=Path, help="config file (default /etc/gpud/gpud.yaml)")
    run.add_argument("--simulate", metavar="MACHINE", help="use a simulated GPU machine")
    run.add_argument("--backend", choices=["auto", "nvml", "sim"], help="hardware backend")
    run.add_argument("--kubelet-dir", type=Path, help="kubelet's device-plugin directory")
    run.add_argument("--state-dir", type=Path, help="where gpud keeps state (/var/lib/gpud)")
    run.add_argument("--socket", type=Path, help="control socket (/run/gpud/gpud.sock)")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "--nfd-dir",
        type=Path,
        metavar="DIR",
        help="NFD's features.d, where gpud publishes node labels "
        "(/etc/kubernetes/node-feature-discovery/features.d)",
    )
    run.add_argument(
        "--metrics-listen",
        metavar="ADDR",
        help="where /metrics is served: :PORT for every address, HOST:PORT or [IPV6]:PORT (:9400)",
    )
    run.add_argument(
        "--kubeconfig",
        type=Path,
        metavar="PATH",
        help="kubeconfig for gpud's link to the API server (default: the kubelet's own)",
    )
    run.add_argument(
        "--node-name",
        type=_node_name,
        metavar="NAME",
        help="this node's Node name (default: the kubelet credential's, else the hostname)",
    )

    boot = sub.add_parser(
        "bootstrap",
        help="set up a new GPU node (driver, toolkit, containerd, CDI, gpud.service); idempotent",
    )
    boot.add_argument("--config", type=Path, help="config file (default /etc/gpud/gpud.yaml)")
    boot.add_argument(
        "--resume",
        action="store_true",
        help="finish after the driver's reboot (what gpud-bootstrap-resume.service runs)",
    )
    boot.add_argument("-o", "--output", choices=["table", "json"], default="table")

    config = sub.add_parser("config", help="work with config files")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    validate = csub.add_parser("validate", help="check a config file; exit 2 if invalid")
    validate.add_argument("file")
    return p


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from gpud.config.load import ConfigError
    from gpud.config.models import BackendKind
    from gpud.daemon import logs
    from gpud.daemon.compose import compose
    from gpud.daemon.gateway import SocketInUse
    from gpud.daemon.settings import Overrides, resolve
    from gpud.hw.select import make_backend
    from gpud.metrics.address import parse_listen
    from gpud.metrics.publisher import ListenFailed

    if args.metrics_listen is not None:
        try:
            parse_listen(args.metrics_listen)
        except ValueError as exc:
            print(f"gpud: --metrics-listen: {exc}", file=sys.stderr)
            return EXIT_INVALID
    overrides = Overrides(
        simulate=args.simulate,
        backend=BackendKind(args.backend) if args.backend else None,
        kubelet_dir=args.kubelet_dir,
        state_dir=args.state_dir,
        socket=args.socket,
        log_level=args.log_level,
        nfd_dir=args.nfd_dir,
        metrics_listen=args.metrics_listen,
        kubeconfig=args.kubeconfig,
        node_name=args.node_name,
    )
    try:
        settings = resolve(args.config, overrides)
    except ConfigError as exc:
        print(f"gpud: {exc}", file=sys.stderr)
        return EXIT_INVALID
    cfg = settings.config
    logs.setup(cfg.log.level)
    try:
        backend = make_backend(cfg.backend, cfg.simulate, cfg.paths.state_dir)
    except ValueError as exc:
        print(f"gpud: {exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        return asyncio.run(compose(settings, backend).run())
    except (SocketInUse, ListenFailed) as exc:
        print(f"gpud: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except PermissionError as exc:
        print(f"gpud: {exc}; gpud needs root to reach the GPUs and kubelet", file=sys.stderr)
        return EXIT_FAILED


def _bootstrap(args: argparse.Namespace) -> int:
    import json
    import os

    from gpud.cli.hostinfo import host_root
    from gpud.config.load import ConfigError, load
    from gpud.config.models import default_config
    from gpud.host.bootstrap import AWAITING_MOK, Busy, bootstrap, read_state
    from gpud.host.platform import under

    if os.geteuid() != 0:
        print("gpud: bootstrap must run as root (sudo gpud bootstrap)", file=sys.stderr)
        return EXIT_FAILED
    root = host_root()
    # The resume unit passes no --config: the first run's file is in the state file.
    path = args.config or read_state(root).get("config")
    if path is None and under(root, "/etc/gpud/gpud.yaml").exists():
        path = under(root, "/etc/gpud/gpud.yaml")
    try:
        config = load(Path(path)) if path else default_config()
    except ConfigError as exc:
        print(f"gpud: {exc}", file=sys.stderr)
        return EXIT_INVALID
    as_json = args.output == "json"

    def progress(line: str) -> None:
        print(line, file=sys.stderr if as_json else sys.stdout, flush=True)

    try:
        result = bootstrap(
            root,
            config,
            resume=args.resume,
            config_path=str(path) if path else None,
            progress=progress,
        )
    except Busy as exc:
        if as_json:
            busy = {"ok": False, "phase": None, "message": str(exc), "busy_pid": exc.holder.pid}
            print(json.dumps(busy, indent=2))
        print(f"gpud: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(result.message)
    if result.failed is not None:
        verb = "stopped" if result.phase == AWAITING_MOK else "failed"
        print(f"gpud: bootstrap {verb} at step {result.failed.name}", file=sys.stderr)
        if result.failed.fix:
            print(f"fix: {result.failed.fix}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "bootstrap":
        return _bootstrap(args)
    return validate_config(args.file)


if __name__ == "__main__":
    sys.exit(main())
