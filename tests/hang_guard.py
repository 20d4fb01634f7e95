"""The one time limit tests use: a hang guard, far above any honest run on a slow, busy machine.

Tests never assert how fast something ran (that is what benchmarks/ is for); a subprocess or a
spawned rank is only stopped when it is clearly stuck. Raise it with ANDROMEDA_TEST_HANG_GUARD_S.
"""

import os

HANG_GUARD_S = float(os.environ.get("ANDROMEDA_TEST_HANG_GUARD_S", "3600"))
