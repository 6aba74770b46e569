"""A local five-host cluster for tests and the demo: ``python -m tests.cluster up|down|status|reboot``.

Each host is a systemd-nspawn container booted with real systemd, on a private bridge with no route out,
with fake Raspberry Pi 5 or GPU-host hardware files bound over the kernel's own paths.
See ``docs/local-cluster.md``.
"""
