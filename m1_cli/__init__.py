"""The ``m1`` command line (kept free of heavy imports so ``m1 --help`` is instant)."""
