"""`python -m commands`: the `ckptdpo` command."""

import sys

from commands.cli import main

sys.exit(main())
