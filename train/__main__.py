"""``python -m lens_fast.train ...`` (also under torchrun)."""
import sys

from .cli import main

sys.exit(main())
