"""``config validate``, shared by ``gpud`` and ``gpudctl``: every problem at once, exit 2."""

from __future__ import annotations

import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def validate_config(path: str) -> int:
    from gpud.config.load import ConfigError, load

    try:
        load(Path(path))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    print(f"{path}: valid")
    return EXIT_OK
