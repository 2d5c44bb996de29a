"""cnvmd: the per-host daemon that runs, exposes and teleports cnvms."""

__version__ = "0.1.0"
