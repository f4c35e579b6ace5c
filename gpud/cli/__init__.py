"""Command-line front doors: ``gpud`` (the daemon and node-local setup) and ``gpudctl``."""
