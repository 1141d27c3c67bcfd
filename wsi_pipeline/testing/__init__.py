"""Conformance suites shipped with the package, as zarr-python ships its store tests: a third-party slide reader
backend subclasses `ReaderConformance` in its own test file and runs the project's checks with one import.

    from wsi_pipeline.testing import ReaderConformance

    class TestMyReader(ReaderConformance):
        backend_name = "mine"

Needs pytest (a test dependency, not a runtime one)."""

from wsi_pipeline.testing.files import damage_tile
from wsi_pipeline.testing.readers import ReaderConformance

__all__ = ["ReaderConformance", "damage_tile"]
