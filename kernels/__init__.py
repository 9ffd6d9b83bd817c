"""Triton kernels of lens_fast, installed as ``lens_fast.kernels`` (never as ``kernels``:
that is Hugging Face's package, which transformers imports; see lens_fast/_checkout.py)."""
if __name__ != "lens_fast.kernels":  # the bare name, from a checkout's root
    import os as _os
    import runpy as _runpy
    _runpy.run_path(_os.path.join(_os.path.dirname(__file__), _os.pardir, "lens_fast", "_checkout.py"))[
        "hand_over"](__name__, __file__)
