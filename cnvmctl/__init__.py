"""cnvmctl: the thin command-line client of cnvmd.

Commands live in modules of ``cnvmctl.commands`` and register themselves with
``cnvmctl.registry.command``; see that module for how to add one.
"""

__version__ = "0.1.0"
