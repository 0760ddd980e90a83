"""`python -m worker` is `fabric-worker`, for hosts without the console script."""

import sys

from worker.cli import main

sys.exit(main())
