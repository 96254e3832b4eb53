"""``python -m daemon``: the same as the ``remoteclusterd`` command."""

from daemon.cli import main

raise SystemExit(main())
