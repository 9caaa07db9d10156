"""sidecar-agent: a monitoring agent that loses nothing, duplicates nothing and shows everything."""

__version__ = "0.1.0"
