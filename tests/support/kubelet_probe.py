"""Run the fake kubelet in a directory until the named resources register, then report them.

For the package test: it runs inside the test container, under the package's own Python, so it
checks that the installed daemon, inside its systemd sandbox, can create its plugin sockets in
a kubelet directory that appeared after it started, and register there. Prints one JSON object,
resource -> allocatable devices, and exits 0; exits 1 naming what did not register in time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tests.support.kubelet import FakeKubelet


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("plugin_dir", type=Path)
    parser.add_argument("resources", nargs="+")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    kubelet = FakeKubelet(args.plugin_dir)
    kubelet.start()
    try:
        seen: dict[str, int] = {}
        for resource in args.resources:
            try:
                kubelet.wait_registered(resource, timeout=args.timeout)
                kubelet.wait_devices(resource, bool, timeout=args.timeout)
            except AssertionError as exc:
                print(f"{resource} did not register: {exc}", file=sys.stderr)
                return 1
            seen[resource] = kubelet.allocatable(resource)
        print(json.dumps(seen))
        return 0
    finally:
        kubelet.stop()


if __name__ == "__main__":
    sys.exit(main())
