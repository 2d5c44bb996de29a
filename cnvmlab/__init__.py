"""The lab: test/demo harness of network-namespace hosts, one cnvmd per node.

Not part of the daemon (nothing in `cnvmd` imports it); `cnvmctl lab`, the demo,
the tests and the benchmarks use it. `cnvmlab.paths` says where a lab node's
daemon keeps its socket, state and runc root; `cnvmlab.lab.Lab` builds and tears
down labs.
"""
