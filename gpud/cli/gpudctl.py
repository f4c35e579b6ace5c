"""``gpudctl``: the operator's view of, and handle on, a running gpud.

Reads like kubectl: verbs, ``-o table|json|yaml``, exit 0 on success, 1 when the operation
failed, 2 when the input was wrong. Every error goes to stderr with what to do about it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from gpud.cli.validate import EXIT_FAILED, EXIT_INVALID, EXIT_OK, validate_config

DEFAULT_SOCKET = "/run/gpud/gpud.sock"

EPILOG = """\
examples:
  gpudctl status                      GPUs, their health and the device plugins
  gpudctl devices -o json             the GPUs as JSON
  sudo gpudctl device set-healthy GPU-…   return a repaired GPU to service
  gpudctl config validate gpud.yaml   check a config file (exit 2 if invalid)

environment: GPUD_SOCKET overrides the default socket (/run/gpud/gpud.sock)
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


def _parser() -> argparse.ArgumentParser:
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

    device = sub.add_parser("device", help="act on one GPU")
    dsub = device.add_subparsers(dest="device_command", required=True, metavar="COMMAND")
    healthy = dsub.add_parser("set-healthy", help="return a GPU to service after a repair")
    healthy.add_argument("uuid")
    _add_output(healthy)

    config = sub.add_parser("config", help="config files")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    csub.add_parser("validate", help="check a config file").add_argument("file")
    csub.add_parser("reload", help="make gpud re-read its config file (needs root)")

    debug = sub.add_parser("debug", help="fault injection (simulated backend only)")
    gsub = debug.add_subparsers(dest="debug_command", required=True, metavar="COMMAND")
    xid = gsub.add_parser("inject-xid", help="raise an XID error on a simulated GPU")
    xid.add_argument("--gpu", type=int, required=True, metavar="INDEX")
    xid.add_argument("--xid", type=int, required=True, metavar="N")
    lost = gsub.add_parser("inject-gpu-lost", help="make a simulated GPU fall off the bus")
    lost.add_argument("--gpu", type=int, required=True, metavar="INDEX")
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
    elif args.command == "device":
        reply = _call(
            args.socket,
            lambda s: s.SetDeviceHealthy,
            gpud_pb2.SetDeviceHealthyRequest(uuid=args.uuid),
        )
        gpu = output.gpu_dict(reply.gpu)
        print(output.render(gpu, fmt, f"GPU {gpu['index']} ({gpu['uuid']}) is back in service"))
    elif args.command == "config" and args.config_command == "reload":
        reply = _call(args.socket, lambda s: s.ReloadConfig, gpud_pb2.ReloadConfigRequest())
        print(f"reloaded {reply.config_file or 'built-in defaults'}")
    elif args.debug_command == "inject-xid":
        reply = _call(
            args.socket,
            lambda s: s.InjectXid,
            gpud_pb2.InjectXidRequest(gpu_index=args.gpu, xid=args.xid),
        )
        effect = "marked Unhealthy" if reply.marked_unhealthy else "ignored (application XID)"
        print(f"XID {args.xid} on GPU {args.gpu} ({reply.uuid}): {effect}")
    else:
        reply = _call(
            args.socket,
            lambda s: s.InjectGpuLost,
            gpud_pb2.InjectGpuLostRequest(gpu_index=args.gpu),
        )
        print(f"GPU {args.gpu} ({reply.uuid}) is now lost")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "config" and args.config_command == "validate":
        return validate_config(args.file)
    try:
        return _dispatch(args)
    except Failure as exc:
        print(f"gpudctl: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
