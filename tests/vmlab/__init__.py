"""VM lab: cnvm inside small Debian trixie guests under QEMU TCG.

Why: these hosts' kernel lacks MEM_SOFT_DIRTY, so CRIU pre-dump (teleport's
precopy and hybrid modes) can only be tested inside guests with a stock kernel.

Pieces:
- ``image.py``  cached guest image (debootstrap trixie + CRIU 4.2 from forky + the
  project's deps), in /var/cache/cnvm/vmlab/img-<recipe hash>; rebuilt only when
  the recipe changes.
- ``lab.py``    ``VMLab``: boot N guests (user-mode NIC with restrict=on + ssh
  hostfwd on 127.0.0.1; private L2 link ``lv0`` over UDP on 127.0.0.1 with static
  addresses 10.77.0.11, .12, ...), ``ssh``/``popen``/``copy_to``/``copy_from``,
  ``install_project``, ``start_daemons``, ``down``.
- ``hub.py``    learning hub for the private link when there are 3+ guests.
- ``smoke.py``  in-guest checks: ``criu check --feature mem_dirty_track`` and a
  pre-dump x2 + dump + restore round report.
- ``conftest.py`` fixtures: ``vmlab_image`` and the ``vmlab_boot(n=, mem_mib=)``
  factory (labs torn down at session end); skips with a reason when the machine
  cannot run the lane.

For another lane (e.g. teleport), in a module under tests/vmlab/::

    @pytest.fixture(scope="module")
    def lab(vmlab_boot):
        lab = vmlab_boot(n=3)
        lab.install_project()
        lab.start_daemons()
        return lab

CLI: ``scripts/vmlab build | smoke | shell``.
"""
