"""The test suite. One intra-op torch thread per test process, inherited by the demos and
torchrun ranks the tests start: on a busy 2-core machine torch's spinning pools slow a small MLP ~15x."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
