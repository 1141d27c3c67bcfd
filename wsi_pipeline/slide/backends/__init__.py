"""Slide reader backends; each module registers itself with `wsi_pipeline.slide.reader.register_backend`."""
