"""``python -m orthofx`` = the ``orthofx`` command."""

from orthofx.cli import main

if __name__ == "__main__":  # spawned worker processes (``orthofx demo --jobs``) import this module too
    raise SystemExit(main())
