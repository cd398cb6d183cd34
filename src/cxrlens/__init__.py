"""cxrlens: train, ensemble and explain chest X-ray classifiers.

Stages, one module each, importable alone: ``taxonomy`` and ``data`` -> ``models`` -> ``train`` /
``evaluate`` / ``ensemble`` -> ``explain`` (local) and ``nap`` (global) -> ``score`` -> ``report`` /
``serve``. The ``cxrlens`` command (``cli``) is a thin layer over them.
"""

__version__ = "0.1.0"
