"""CUDA C++ sources of the cupy backend, compiled at run time by NVRTC (shipped as package data)."""
