"""``python -m orthofx`` = the ``orthofx`` command."""

from orthofx.cli import main

raise SystemExit(main())
