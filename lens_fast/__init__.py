"""lens_fast: Microsoft's Lens text-to-image model, run, trained and distilled fast.

Public API: ``LensTransformer2DModel``, ``LensPipeline``, ``LensVAE``. Everything loads
the official diffusers-format checkpoint folders (``microsoft/Lens``, ``Lens-Base``,
``Lens-Turbo``) and reproduces the reference implementation's numbers.
"""
__version__ = "0.1.0"

from .models.transformer import LensTransformer2DModel, Transformer2DModelOutput
from .vae import LensVAE
from .pipeline import LensPipeline, LensPipelineOutput

__all__ = ["LensTransformer2DModel", "Transformer2DModelOutput", "LensPipeline",
           "LensPipelineOutput", "LensVAE", "__version__"]
