"""tempeh: multi-view volumetric head registration."""

__version__ = "0.1.0"
