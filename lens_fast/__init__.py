"""lens_fast: Microsoft's Lens text-to-image model, run, trained and distilled fast.

Public API: ``LensTransformer2DModel``, ``LensPipeline``, ``LensVAE``. Everything loads
the official diffusers-format checkpoint folders (``microsoft/Lens``, ``Lens-Base``,
``Lens-Turbo``) and reproduces the reference implementation's numbers.

The names are imported on first use (``from lens_fast import LensPipeline`` loads torch and
the model code then), so ``import lens_fast.cli`` or ``lens_fast.errors`` stays cheap.
"""
import importlib

__version__ = "0.1.0"

_PUBLIC = {"LensTransformer2DModel": ".models.transformer", "Transformer2DModelOutput": ".models.transformer",
           "LensPipeline": ".pipeline", "LensPipelineOutput": ".pipeline", "LensVAE": ".vae"}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lens_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
