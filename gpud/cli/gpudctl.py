"""``gpudctl``: the operator's view of, and handle on, a running gpud.

Reads like kubectl: verbs, ``-o table|json|yaml``, exit 0 on success, 1 when the operation
failed, 2 when the input was wrong. Every error goes to stderr with what to do about it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpud.cli.validate import EXIT_FAILED, EXIT_INVALID, EXIT_OK, validate_config

DEFAULT_SOCKET = "/run/gpud/gpud.sock"

EPILOG = """\
examples:
  gpudctl doctor                      every check of this node, a fix for each failure
  gpudctl status                      GPUs, their health and the device plugins
  gpudctl devices -o json             the GPUs as JSON
  gpudctl top                         live load of every GPU and MIG device, and its pods
  gpudctl labels                      the node labels gpud publishes through NFD
  sudo gpudctl device set-healthy GPU-…   return a repaired GPU to service
  gpudctl config validate gpud.yaml   check a config file (exit 2 if invalid)
  gpudctl driver status -o json       the NVIDIA driver: packages, module, reboot, problems
  sudo gpudctl driver install --dry-run   what installing the driver would run
  sudo gpudctl toolkit configure --cdi   add the nvidia runtime to containerd (in place)
  gpudctl dra manifests | kubectl apply -f -   the DeviceClasses for DRA nodes (cluster admin)

environment: GPUD_SOCKET overrides the default socket (/run/gpud/gpud.sock);
  GPUD_ROOT reads another root directory for platform and driver (chroots, tests)
exit status: 0 success, 1 failure, 2 invalid input
"""


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o",
        "--output",
        choices=("table", "json", "yaml"),
        default=argparse.SUPPRESS,
        help="output format (default table)",
    )


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} s is not between 0.1 and 3600")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Public so that gpud.cli.completion reads the same parser the command runs."""
    p = argparse.ArgumentParser(
        prog="gpudctl",
        description="Inspect and operate the gpud daemon on this node.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--socket",
        default=os.environ.get("GPUD_SOCKET", DEFAULT_SOCKET),
        help="gpud's control socket",
    )
    _add_output(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_output(sub.add_parser("status", help="the node: GPUs, health, plugins"))
    _add_output(sub.add_parser("devices", help="the GPUs"))
    top = sub.add_parser(
        "top", help="live per-device utilization, memory, temperature, power and the pods using it"
    )
    top.add_argument("--once", action="store_true", help="print one view and exit")
    top.add_argument(
        "--interval",
        type=_positive_seconds,
        default=2.0,
        metavar="SECONDS",
        help="time between refreshes (default 2)",
    )
    _add_output(top)

    device = sub.add_parser("device", help="act on one GPU")
    dsub = device.add_subparsers(dest="device_command", required=True, metavar="COMMAND")
    healthy = dsub.add_parser("set-healthy", help="return a GPU to service after a repair")
    healthy.add_argument("uuid")
    _add_output(healthy)

    config = sub.add_parser("config", help="config files")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    csub.add_parser("validate", help="check a config file").add_argument("file")
    csub.add_parser("reload", help="make gpud re-read its config file (needs root)")

    mig = sub.add_parser("mig", help="MIG layouts (mig-parted's config format)")
    msub = mig.add_subparsers(dest="mig_command", required=True, metavar="COMMAND")
    apply = msub.add_parser("apply", help="partition the GPUs as a named layout says (root)")
    apply.add_argument("-c", "--config-name", required=True, metavar="NAME", help="layout name")
    apply.add_argument(
        "-f", "--config-file", metavar="FILE", help="mig-parted config (default: gpud's layouts)"
    )
    apply.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    apply.add_argument(
        "--force",
        action="store_true",
        help="destroy instances even while pods or processes use them",
    )
    _add_output(apply)
    check = msub.add_parser(
        "assert", help="exit 0 if the GPUs hold a layout, 1 listing the differences if not"
    )
    check.add_argument("-c", "--config-name", required=True, metavar="NAME", help="layout name")
    check.add_argument(
        "-f", "--config-file", metavar="FILE", help="mig-parted config (default: gpud's layouts)"
    )
    _add_output(check)
    _add_output(msub.add_parser("show", help="MIG mode and instances of every GPU"))
    export = msub.add_parser("export", help="the current layout as a mig-parted config")
    export.add_argument(
        "-o", "--output", choices=("yaml", "json"), default=argparse.SUPPRESS, help="default yaml"
    )
    validate = msub.add_parser("validate", help="check a mig-parted config file; exit 2 if invalid")
    validate.add_argument("-f", "--config-file", required=True, metavar="FILE")
    validate.add_argument("-c", "--config-name", metavar="NAME", help="also check this name exists")

    _add_output(
        sub.add_parser("doctor", help="every host and daemon check, with a fix for each failure")
    )
    _add_output(sub.add_parser("platform", help="this node's OS, Kubernetes and containerd paths"))
    driver = sub.add_parser("driver", help="the NVIDIA driver on this node (no daemon needed)")
    rsub = driver.add_subparsers(dest="driver_command", required=True, metavar="COMMAND")
    _add_output(
        rsub.add_parser("status", help="packages, module, nouveau, Secure Boot; exit 1 on problems")
    )
    dinst = rsub.add_parser("install", help="install a driver with ubuntu-drivers, then verify")
    dinst.add_argument("--branch", metavar="B", help="550, 550-server… (default: newest server)")
    dinst.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    dinst.add_argument(
        "--include-dkms",
        action="store_true",
        help="allow modules built here by DKMS (kernels without Canonical's prebuilt modules)",
    )
    dinst.add_argument(
        "--lock-timeout",
        type=int,
        metavar="SECONDS",
        help="wait this long for the dpkg lock (default 600)",
    )
    dinst.add_argument(
        "-o", "--output", choices=("table", "json"), default=argparse.SUPPRESS, help="default table"
    )

    toolkit = sub.add_parser("toolkit", help="the NVIDIA container toolkit (root, no daemon)")
    tsub = toolkit.add_subparsers(dest="toolkit_command", required=True, metavar="COMMAND")
    tconf = tsub.add_parser(
        "configure",
        help="add the nvidia runtime to containerd's config, in place; restart if it changed",
    )
    tconf.add_argument(
        "--config",
        metavar="FILE",
        help="top-level containerd config (default: the platform's, see gpudctl platform); "
        "gpud edits it or the imported drop-in that decides",
    )
    tconf.add_argument("--set-as-default", action="store_true", help="make nvidia the default")
    tconf.add_argument("--cdi", action="store_true", help="set enable_cdi = true")
    tconf.add_argument("--no-restart", action="store_true", help="do not restart containerd")
    tconf.add_argument(
        "-o", "--output", choices=("table", "json"), default=argparse.SUPPRESS, help="default table"
    )
    tinst = tsub.add_parser("install", help="apt-get install nvidia-container-toolkit if missing")
    tinst.add_argument("--dry-run", action="store_true", help="say what would run, change nothing")
    tinst.add_argument("--gpud-config", metavar="FILE", help="default /etc/gpud/gpud.yaml")
    tinst.add_argument(
        "--lock-timeout",
        type=int,
        metavar="SECONDS",
        help="wait this long for the dpkg lock (default: apt.lockTimeout, 600)",
    )
    tstat = tsub.add_parser("status", help="package, runtime config, CDI spec; exit 1 on problems")
    tcdi = tsub.add_parser("cdi", help="nvidia-ctk cdi generate (skipped without nvidia-ctk)")
    tcdi.add_argument("--output", dest="output_file", metavar="PATH", help="spec file to write")
    for tp in (tinst, tstat, tcdi):
        tp.add_argument("-o", choices=("table", "json"), default=argparse.SUPPRESS, dest="output")

    debug = sub.add_parser("debug", help="fault injection (simulated backend only)")
    gsub = debug.add_subparsers(dest="debug_command", required=True, metavar="COMMAND")
    xid = gsub.add_parser("inject-xid", help="raise an XID error on a simulated GPU")
    xid.add_argument("--gpu", type=int, required=True, metavar="INDEX")
    xid.add_argument("--xid", type=int, required=True, metavar="N")
    xid.add_argument("--gi", type=int, metavar="ID", help="scope it to this GPU instance")
    xid.add_argument("--ci", type=int, metavar="ID", help="and this compute instance in it")
    lost = gsub.add_parser("inject-gpu-lost", help="make a simulated GPU fall off the bus")
    lost.add_argument("--gpu", type=int, required=True, metavar="INDEX")
    proc = gsub.add_parser("inject-process", help="pretend a process uses a simulated GPU")
    proc.add_argument("--gpu", type=int, required=True, metavar="INDEX")
    proc.add_argument("--pid", type=int, required=True)
    proc.add_argument("--mig", metavar="MIG-UUID", default="", help="on this MIG device")
    proc.add_argument("--remove", action="store_true", help="the process has exited")
    load = gsub.add_parser(
        "set-load", help="set a simulated GPU's or MIG instance's load (what telemetry reads)"
    )
    load.add_argument("--gpu", type=int, required=True, metavar="INDEX")
    load.add_argument("--gi", type=int, metavar="ID", help="this GPU instance (MIG mode)")
    load.add_argument("--util", type=float, metavar="PCT", help="utilization, 0-100")
    load.add_argument("--memory-mib", type=int, metavar="MIB", help="memory in use")
    load.add_argument(
        "--auto", action="store_true", help="back to the built-in load that moves over time"
    )
    _add_output(sub.add_parser("labels", help="the node labels gpud publishes, and where"))
    dra = sub.add_parser("dra", help="Dynamic Resource Allocation (allocation.mode: dra)")
    asub = dra.add_subparsers(dest="dra_command", required=True, metavar="COMMAND")
    manifests = asub.add_parser(
        "manifests", help="the DeviceClasses a cluster admin applies (no daemon needed)"
    )
    manifests.add_argument(
        "--driver-name",
        default="gpu.nvidia.com",
        metavar="NAME",
        help="the nodes' dra.driverName (default gpu.nvidia.com)",
    )
    return p


class Failure(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _call(socket: str, method: Callable[[Any], Callable[..., Any]], request: object) -> Any:
    import grpc

    from gpud._proto.gpud.v1 import gpud_pb2_grpc

    with grpc.insecure_channel(f"unix:{socket}") as channel:
        try:
            return method(gpud_pb2_grpc.GpudStub(channel))(request, timeout=30)
        except grpc.RpcError as exc:
            raise _explain(exc, socket) from None


def _explain(exc: Any, socket: str) -> Failure:
    import grpc

    code, details = exc.code(), exc.details() or ""
    if code is grpc.StatusCode.UNAVAILABLE:
        if "Permission denied" in details:
            return Failure(
                f"cannot open {socket}: permission denied; use sudo, or join the socket's group "
                "(sudo usermod -aG gpud $USER, then log in again)",
                EXIT_FAILED,
            )
        return Failure(
            f"cannot reach gpud at {socket}: is it running? (systemctl status gpud); "
            "--socket or GPUD_SOCKET point elsewhere",
            EXIT_FAILED,
        )
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
        return Failure(details, EXIT_INVALID)
    return Failure(details or code.name, EXIT_FAILED)


def _status(args: argparse.Namespace) -> dict[str, Any]:
    from gpud._proto.gpud.v1 import gpud_pb2
    from gpud.cli.output import status_dict

    return status_dict(_call(args.socket, lambda s: s.GetStatus, gpud_pb2.GetStatusRequest()))


def _dispatch(args: argparse.Namespace) -> int:
    from gpud._proto.gpud.v1 import gpud_pb2
    from gpud.cli import output

    fmt = getattr(args, "output", "table")
    if args.command == "status":
        st = _status(args)
        print(output.render(st, fmt, output.status_table(st)))
    elif args.command == "devices":
        gpus = _status(args)["gpus"]
        print(output.render(gpus, fmt, output.gpu_table(gpus)))
    elif args.command == "top":
        from gpud.cli.top import run_top

        request = gpud_pb2.ReadDevicesRequest()
        return run_top(
            lambda: _call(args.socket, lambda s: s.ReadDevices, request), Failure, args, fmt
        )
    elif args.command == "device":
        reply = _call(
            args.socket,
            lambda s: s.SetDeviceHealthy,
            gpud_pb2.SetDeviceHealthyRequest(uuid=args.uuid),
        )
        print(output.render(output.gpu_dict(reply.gpu), fmt, reply.message))
    elif args.command == "config" and args.config_command == "reload":
        reply = _call(args.socket, lambda s: s.ReloadConfig, gpud_pb2.ReloadConfigRequest())
        print(f"reloaded {reply.config_file or 'built-in defaults'}")
    elif args.command == "mig":
        return _mig(args, fmt)
    elif args.command == "labels":
        reply = _call(args.socket, lambda s: s.GetLabels, gpud_pb2.GetLabelsRequest())
        data = output.labels_dict(reply)
        print(output.render(data, fmt, output.labels_text(data, reply.detail)))
    elif args.debug_command == "inject-process":
        _call(
            args.socket,
            lambda s: s.InjectProcess,
            gpud_pb2.InjectProcessRequest(
                gpu_index=args.gpu, pid=args.pid, mig_uuid=args.mig, remove=args.remove
            ),
        )
        verb = "no longer uses" if args.remove else "now uses"
        print(f"pid {args.pid} {verb} GPU {args.gpu}{' ' + args.mig if args.mig else ''}")
    elif args.debug_command == "set-load":
        _set_load(args)
    elif args.debug_command == "inject-xid":
        if args.ci is not None and args.gi is None:
            raise Failure("--ci needs --gi: a compute instance is inside a GPU instance", 2)
        reply = _call(
            args.socket,
            lambda s: s.InjectXid,
            gpud_pb2.InjectXidRequest(
                gpu_index=args.gpu, xid=args.xid, gi_id=args.gi, ci_id=args.ci
            ),
        )
        effect = "marked Unhealthy" if reply.marked_unhealthy else "ignored (application XID)"
        scope = "" if args.gi is None else f" GPU instance {args.gi}"
        scope += "" if args.ci is None else f" compute instance {args.ci}"
        print(f"XID {args.xid} on GPU {args.gpu}{scope} ({reply.uuid}): {effect}")
    else:
        reply = _call(
            args.socket,
            lambda s: s.InjectGpuLost,
            gpud_pb2.InjectGpuLostRequest(gpu_index=args.gpu),
        )
        print(f"GPU {args.gpu} ({reply.uuid}) is now lost")
    return EXIT_OK


def _set_load(args: argparse.Namespace) -> None:
    from gpud._proto.gpud.v1 import gpud_pb2

    if args.util is None and args.memory_mib is None and not args.auto:
        raise Failure("nothing to set: give --util, --memory-mib or --auto", EXIT_INVALID)
    reply = _call(
        args.socket,
        lambda s: s.SetLoad,
        gpud_pb2.SetLoadRequest(
            gpu_index=args.gpu,
            gi_id=args.gi,
            utilization_pct=args.util,
            memory_used_mib=args.memory_mib,
            automatic=args.auto,
        ),
    )
    where = f"GPU {args.gpu}" + ("" if args.gi is None else f" GPU instance {args.gi}")
    print(f"{where} ({reply.uuid}): {reply.load}")


def _read_layouts(path: str) -> str:
    """A layout file's text, refused here when it is over gpud's size bound: sent as it is, a
    large file would meet gRPC's message limit and its raw error instead."""
    from gpud.mig.layout import LayoutError, read_text

    try:
        return read_text(Path(path))
    except LayoutError as exc:
        raise Failure(str(exc), EXIT_INVALID) from None


def _layout_source(args: argparse.Namespace) -> dict[str, str]:
    """The request fields naming the layout file; none (gpud's own layouts) without ``-f``."""
    if not args.config_file:
        return {}
    return {
        "config_yaml": _read_layouts(args.config_file),
        "config_source": str(Path(args.config_file).resolve()),
    }


def _mig(args: argparse.Namespace, fmt: str) -> int:
    from gpud._proto.gpud.v1 import gpud_pb2
    from gpud.cli import output

    if args.mig_command == "assert":
        found = _call(
            args.socket,
            lambda s: s.AssertMigLayout,
            gpud_pb2.AssertMigLayoutRequest(config_name=args.config_name, **_layout_source(args)),
        )
        data = {"applied": found.applied, "differences": list(found.differences)}
        lines = [f"layout {args.config_name!r} is {'' if found.applied else 'not '}applied"]
        lines += [f"  {d}" for d in found.differences]
        print(output.render(data, fmt, "\n".join(lines)))
        return EXIT_OK if found.applied else EXIT_FAILED
    if args.mig_command == "apply":
        reply = _call(
            args.socket,
            lambda s: s.ApplyMigLayout,
            gpud_pb2.ApplyMigLayoutRequest(
                config_name=args.config_name,
                dry_run=args.dry_run,
                force=args.force,
                **_layout_source(args),
            ),
        )
        data = output.apply_dict(reply)
        print(output.render(data, fmt, output.apply_table(data)))
        if reply.result != "failed":
            return EXIT_OK
        print(f"gpudctl: {reply.message}", file=sys.stderr)
        return EXIT_INVALID if reply.error_kind == "invalid" else EXIT_FAILED
    state = _call(args.socket, lambda s: s.GetMigState, gpud_pb2.GetMigStateRequest())
    if args.mig_command == "export":
        if getattr(args, "output", "yaml") == "json":
            import json

            import yaml

            print(json.dumps(yaml.safe_load(state.export_yaml), indent=2))
        else:
            print(state.export_yaml.rstrip())
        return EXIT_OK
    data = output.mig_dict(state)
    print(output.render(data, fmt, output.mig_table(data)))
    return EXIT_OK


def _validate_layouts(path: str, name: str | None) -> int:
    """Local check of a mig-parted file: format, profile names, and that ``name`` exists.

    Whether a layout fits the GPUs of a node is for that node's gpud to say:
    ``gpudctl mig apply --dry-run``.
    """
    from gpud.mig.layout import LayoutError, load

    try:
        config = load(Path(path))
    except LayoutError as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    if name is not None and name not in config.names:
        print(
            f"{path}: no layout named {name!r}; it has {', '.join(config.names)}", file=sys.stderr
        )
        return EXIT_INVALID
    print(f"{path}: valid, {len(config.names)} layouts")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config" and args.config_command == "validate":
        return validate_config(args.file)
    if args.command == "mig" and args.mig_command == "validate":
        return _validate_layouts(args.config_file, args.config_name)
    if args.command == "doctor":
        from gpud.cli.doctor import doctor_command

        return doctor_command(args.socket, getattr(args, "output", "table"))
    if args.command in ("platform", "driver"):
        from gpud.cli import hostinfo

        fmt = getattr(args, "output", "table")
        if args.command == "platform":
            return hostinfo.platform_command(fmt)
        if args.driver_command == "status":
            return hostinfo.driver_status_command(fmt)
        if args.driver_command == "install":
            from gpud.cli.driver import driver_install_command

            return driver_install_command(args, fmt)
    if args.command == "dra" and args.dra_command == "manifests":
        from gpud.dra.manifests import manifests_yaml

        try:
            sys.stdout.write(manifests_yaml(args.driver_name))
        except ValueError as exc:
            print(f"gpudctl: --driver-name: {exc}", file=sys.stderr)
            return EXIT_INVALID
        return EXIT_OK
    if args.command == "toolkit":
        from gpud.cli.toolkit import toolkit_command

        return toolkit_command(args, getattr(args, "output", "table"))
    try:
        return _dispatch(args)
    except Failure as exc:
        print(f"gpudctl: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
