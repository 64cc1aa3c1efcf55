"""The ``histo-robust`` command line (see :mod:`histo_robust.cli`)."""
