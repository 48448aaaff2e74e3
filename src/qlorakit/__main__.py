"""`python -m qlorakit ...`, as torchrun starts each process of a run: `torchrun --nproc-per-node N -m qlorakit
train ...`."""

import sys

from .cli import main

sys.exit(main())
