"""GPU metrics for Prometheus under dcgm-exporter's names, with gpud's own beside them.

Read when scraped, never polled: a node nobody scrapes spends nothing on metrics.
"""
