"""Settings for the numba backend's tests, which run in the Numba CUDA simulator or on a GPU.

In the simulator every CUDA thread is a Python thread and each barrier waits for all of them
to be scheduled: a short thread switch interval makes barriers, and the whole module, several
times faster (it changes nothing in what the tests compute).
"""

import os
import sys

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    sys.setswitchinterval(2e-4)
