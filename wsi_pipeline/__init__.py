"""wsi-pipeline: whole-slide image analysis."""

__version__ = "0.1.0"
