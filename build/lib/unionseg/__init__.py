"""unionseg: one multi-organ CT segmenter trained from several partially labelled datasets.

Importing the package is cheap: torch, MONAI and the image libraries are imported by the modules that
need them, never here.
"""

from unionseg.errors import UnionsegError

__version__ = "0.1.0"
__all__ = ["UnionsegError", "__version__"]
