"""`python -m orchestrator ...` is the `baim` command line."""

from orchestrator.cli import main

raise SystemExit(main())
