"""`python -m benchmarks`: the harness's sweep (see `cli.py`)."""

from benchmarks.cli import main

raise SystemExit(main())
