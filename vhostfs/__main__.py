"""`python -m vhostfs`: the same as the `vhostfs` command."""

from vhostfs.cli import main

raise SystemExit(main())
