"""cnvmctl subcommand modules; every module here is imported and registers commands.

See cnvmctl.registry for the API. One module per topic (core, lab, images,
lifecycle, teleport, ...), owned by the engineer of that subsystem.
"""
