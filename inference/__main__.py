"""Entry point: ``python -m inference <command>``."""

from inference.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
