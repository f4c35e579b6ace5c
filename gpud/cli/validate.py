"""``config validate``, shared by ``gpud`` and ``gpudctl``: every problem at once, exit 2."""

from __future__ import annotations

import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def validate_config(path: str) -> int:
    """The file, and the NVIDIA device-plugin file it names (devicePlugin.configFile), if any."""
    from gpud.config.load import ConfigError, load
    from gpud.config.nvidia_plugin import apply_config_file

    try:
        _, warnings = apply_config_file(load(Path(path)))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path}: valid")
    return EXIT_OK
