"""Hypothesis profiles of the hostile-input suite.

`hostile-ci` (the default, for `make test`): FERRY_FUZZ_CI_EXAMPLES (5) examples per route and per
method, derandomized (the same examples on every run), no example database.
`hostile-fuzz` (FERRY_FUZZ_EXAMPLES=N): N random examples per route and per method, with hypothesis'
example database (.hypothesis/), so that a failure found once replays first on the next run.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

CI_EXAMPLES = int(os.environ.get("FERRY_FUZZ_CI_EXAMPLES", "5"))
FUZZ_EXAMPLES = int(os.environ.get("FERRY_FUZZ_EXAMPLES", "0"))
# No deadline (a loaded machine is slow, not wrong); every example talks to the stack, so hypothesis'
# health checks on data generation speed do not apply.
_COMMON = settings(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile(
    "hostile-ci", parent=_COMMON, max_examples=CI_EXAMPLES, derandomize=True, database=None
)
settings.register_profile("hostile-fuzz", parent=_COMMON, max_examples=max(FUZZ_EXAMPLES, 1))
PROFILE = "hostile-fuzz" if FUZZ_EXAMPLES else "hostile-ci"

# The tests' decorator: `@FUZZ`.
FUZZ = settings.get_profile(PROFILE)
