"""`python -m ferry_client.cli ...`: the same as the `ferry` console script."""

import sys

from ferry_client.cli.main import main

sys.exit(main())
