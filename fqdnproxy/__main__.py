"""``python -m fqdnproxy`` runs the command line."""

from fqdnproxy.cli import main

raise SystemExit(main())
