"""`python -m rkmqtt` is the same as the `rkmqtt` command."""

from rkmqtt.cli.main import main

raise SystemExit(main())
