"""lens_fast: Microsoft's Lens text-to-image model, run, trained and distilled fast.

Public API: ``LensTransformer2DModel``, ``LensPipeline``, ``LensVAE``. Everything loads
the official diffusers-format checkpoint folders (``microsoft/Lens``, ``Lens-Base``,
``Lens-Turbo``) and reproduces the reference implementation's numbers.
"""
import os as _os

# Running from a source checkout: `kernels/` and `train/` sit beside this package and
# are installed as `lens_fast.kernels` / `lens_fast.train`. Make the same import paths
# work without an install (tests, benchmarks from the repo root).
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if (_os.path.isfile(_os.path.join(_root, "setup.py"))
        and _os.path.isdir(_os.path.join(_root, "kernels"))
        and not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels"))):
    __path__.append(_root)  # noqa: F821 - package __path__

__version__ = "0.1.0"

from .models.transformer import LensTransformer2DModel, Transformer2DModelOutput  # noqa: E402
from .vae import LensVAE  # noqa: E402
from .pipeline import LensPipeline, LensPipelineOutput  # noqa: E402

__all__ = ["LensTransformer2DModel", "Transformer2DModelOutput", "LensPipeline",
           "LensPipelineOutput", "LensVAE", "__version__"]
