"""``python -m histo_robust``: the same as the ``histo-robust`` command."""

from histo_robust.cli import main

raise SystemExit(main())
