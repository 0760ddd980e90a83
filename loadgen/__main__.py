"""`python -m loadgen` is `fabric-loadgen`, for hosts without the console script."""

from loadgen.cli import main

raise SystemExit(main())
