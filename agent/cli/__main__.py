"""`python -m agent.cli` runs the `sidecar-agent` command."""

import sys

from agent.cli import main

sys.exit(main())
