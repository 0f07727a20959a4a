"""`python -m ckptdpo.grpo --config JOB.yaml [--merge]`: the GRPO entry point the launchers start."""

import sys

from ckptdpo.grpo.run import main

if __name__ == "__main__":
    sys.exit(main())
