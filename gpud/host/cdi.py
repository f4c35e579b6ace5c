"""The NVIDIA CDI spec (``/var/run/cdi/nvidia.yaml``): generating it and checking what it names.

Why gpud runs ``nvidia-ctk cdi generate`` itself: the spec lists device names (``nvidia.com/gpu=0``,
``=GPU-<uuid>``, MIG devices as ``=0:1`` and ``=MIG-<uuid>``) that go stale whenever the driver is
replaced or MIG is repartitioned, and a container asking for a name the spec no longer has fails
to start. The packaged ``nvidia-cdi-refresh`` units only react to module loads, not to MIG changes
(mig-parted restarts them from a hook), so gpud refreshes after each of its own MIG changes.

nvidia-ctk's exit code is not trusted alone: the file must exist afterwards and name
``nvidia.com/gpu=all`` and at least one device. A node without nvidia-ctk is not an error here
(the toolkit is installed later, or the node uses another runtime): the result says "skipped".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpud.host.commands import CommandRunner, missing, run_command

DEFAULT_OUTPUT = Path("/var/run/cdi/nvidia.yaml")
KIND = "nvidia.com/gpu"
GENERATED, SKIPPED, FAILED = "generated", "skipped", "failed"


@dataclass(frozen=True)
class CdiResult:
    status: str
    """``generated``, ``skipped`` (no nvidia-ctk) or ``failed``."""
    path: Path
    message: str
    devices: tuple[str, ...] = ()
    """Fully-qualified names (``nvidia.com/gpu=0``), in the spec's order."""

    @property
    def ok(self) -> bool:
        return self.status != FAILED

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "path": str(self.path),
            "message": self.message,
            "devices": list(self.devices),
        }


def parse_spec(text: str) -> tuple[str, tuple[str, ...]]:
    """(kind, fully-qualified device names) of a CDI spec; ValueError when it is not one."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
        raise ValueError("not a CDI spec: no 'kind'")
    devices = data.get("devices") or []
    if not isinstance(devices, list):
        raise ValueError("not a CDI spec: 'devices' is not a list")
    kind = data["kind"]
    names = tuple(
        f"{kind}={d['name']}" for d in devices if isinstance(d, dict) and d.get("name") is not None
    )
    return kind, names


def spec_problems(kind: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """Why a generated spec is not usable: wrong kind, no ``all``, no per-GPU device."""
    out = []
    if kind != KIND:
        out.append(f"kind is {kind!r}, not {KIND!r}")
    if f"{KIND}=all" not in names:
        out.append(f"no {KIND}=all device")
    if not [n for n in names if not n.endswith("=all")]:
        out.append("no per-GPU devices (does nvidia-smi see the GPUs?)")
    return tuple(out)


def read_spec(path: Path) -> dict[str, Any]:
    """What a spec file says, for status: exists, kind, devices, error (never raises)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {"exists": False, "kind": None, "devices": [], "error": None}
    except (OSError, UnicodeDecodeError) as exc:
        return {"exists": True, "kind": None, "devices": [], "error": f"cannot read: {exc}"}
    try:
        kind, names = parse_spec(text)
    except ValueError as exc:
        return {"exists": True, "kind": None, "devices": [], "error": str(exc)}
    return {"exists": True, "kind": kind, "devices": list(names), "error": None}


def generate_spec(run: CommandRunner = run_command, output: Path = DEFAULT_OUTPUT) -> CdiResult:
    """Run ``nvidia-ctk cdi generate --output=<output> --format=yaml`` and check the file.

    Never raises: the result says generated, skipped (nvidia-ctk not installed) or failed (with
    nvidia-ctk's own error, e.g. NVML not found on a node without a working driver).
    """
    argv = ["nvidia-ctk", "cdi", "generate", f"--output={output}", "--format=yaml"]
    try:
        output.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        return CdiResult(FAILED, output, f"cannot create {output.parent}: {exc}")
    result = run(argv, 120.0)
    if missing(result):
        return CdiResult(SKIPPED, output, "skipped: nvidia-ctk not installed")
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        detail = lines[-1] if lines else result.stdout.strip() or "(no output)"
        return CdiResult(
            FAILED, output, f"nvidia-ctk cdi generate failed (exit {result.returncode}): {detail}"
        )
    spec = read_spec(output)
    if not spec["exists"]:
        return CdiResult(FAILED, output, f"nvidia-ctk exited 0 but {output} was not written")
    if spec["error"]:
        return CdiResult(FAILED, output, f"{output}: {spec['error']}")
    names = tuple(spec["devices"])
    problems = spec_problems(spec["kind"], names)
    if problems:
        return CdiResult(FAILED, output, f"{output}: {'; '.join(problems)}", names)
    return CdiResult(GENERATED, output, f"wrote {output} ({len(names)} devices)", names)


def refresh_after_mig_change(
    run: CommandRunner = run_command, output: Path = DEFAULT_OUTPUT
) -> CdiResult:
    """Regenerate the spec after gpud changed the MIG layout; for the daemon's MIG apply path.

    Call it once after every apply that created or destroyed instances (not per GPU): MIG device
    names (``nvidia.com/gpu=0:1``, ``=MIG-<uuid>``) change with the layout, and pods started with
    a stale name fail in the runtime. It never raises and does not restart anything; the daemon
    should log a ``failed`` result as a warning (the layout itself is applied) and ignore
    ``skipped`` (no toolkit on this node).
    """
    return generate_spec(run, output)
