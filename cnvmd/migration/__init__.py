"""Teleport: live migration of a running cnvm between nodes.

`policy` chooses the mode and decides when pre-copy rounds have converged (pure
functions, unit-tested); `report` is the versioned record of one teleport that
cnvmctl shows and `inspect` keeps.
"""
