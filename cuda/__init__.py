"""CUDA C++ sources of the cupy backend, compiled at run time by NVRTC (shipped as package data).

Installed, this folder is ``cosattn.cuda``. From a checkout whose root is on ``sys.path``
(pytest's ``pythonpath``, ``PYTHONPATH=.``, ``python -c`` run there) it is also found as the
top-level package ``cuda``, which would hide NVIDIA's ``cuda`` namespace package (``cuda.bindings``,
``cuda.pathfinder``: CuPy cannot import without them). Extending ``__path__`` with every other
``cuda`` folder on ``sys.path`` keeps both visible.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
