"""Triton kernels and their launchers, one file per op family (installed as ``vlcore.kernels``).

Importing this package never imports triton; each op family's module does, and is loaded lazily by the
dispatcher only when its backend is chosen.
"""
