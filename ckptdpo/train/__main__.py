"""`python -m ckptdpo.train --config JOB.yaml [--merge]`: the training entry point the launchers start."""

import sys

from ckptdpo.train.run import main

if __name__ == "__main__":
    sys.exit(main())
