"""Settings for the numba backend's tests, which run in the Numba CUDA simulator or on a GPU.

In the simulator every CUDA thread is a Python thread and each barrier waits for all of them
to be scheduled: a short thread switch interval makes barriers, and the whole module, several
times faster (it changes nothing in what the tests compute).

The simulator's ``cuda.shared.array`` (numba-cuda 0.30) finds a launch's array by the calling
line in a dict, with a get-then-create that no lock guards: two threads that both miss create
two arrays, and the one left with its own "shared" array computes with values no other thread
wrote (about one launch in a thousand in a stress loop; in this module a rare flaky failure,
e.g. a sum of squares read back negative). The same lookup under a lock closes the race.
"""

import os
import sys
import threading

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    import numpy as np
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    sys.setswitchinterval(2e-4)
    _unlocked_array = FakeCUDAShared.array
    _allocating = threading.Lock()

    def _shared_array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory; the simulator's error
            return _unlocked_array(self, shape, dtype, alignment)
        caller = sys._getframe(1)
        line = (caller.f_code.co_filename, caller.f_lineno)
        with _allocating:
            if line not in self._allocations:
                self._allocations[line] = np.empty(shape, dtype)
            return self._allocations[line]

    FakeCUDAShared.array = _shared_array
