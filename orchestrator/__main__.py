"""`python -m orchestrator ...` is the `baim` command line."""

from orchestrator.cli.main import main

raise SystemExit(main())
