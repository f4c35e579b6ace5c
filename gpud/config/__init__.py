"""gpud's configuration: ``/etc/gpud/gpud.yaml``, versioned, strict, every path overridable."""
