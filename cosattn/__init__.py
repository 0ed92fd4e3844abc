"""cosattn: Cottention (cosine attention with a learned length stabiliser), linear in length.

``forward`` / ``backward`` run the parallel form on NumPy, CuPy or any DLPack array;
``RecurrentState`` runs the exact recurrent form one token at a time in constant memory;
``StatePool`` keeps many such states in slots for continuous batching.
"""

from .attention import absorb, backward, forward
from .backends import available_backends
from .pool import StatePool
from .recurrent import RecurrentState

__all__ = ["RecurrentState", "StatePool", "absorb", "available_backends", "backward", "forward"]
__version__ = "0.1.0"
