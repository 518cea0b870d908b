"""`python -m p2pcache` is the same as the `p2pcache` command."""

from p2pcache.cli import main

raise SystemExit(main())
