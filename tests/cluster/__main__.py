"""Entry point: ``python -m tests.cluster up|down|status|reboot HOST|image|wheelhouse``."""

from tests.cluster.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
