"""`python -m safety_worker serve|check|status` (see `--help`)."""
from .cli import main

raise SystemExit(main())
