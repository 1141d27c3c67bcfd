"""Exporters: they read finished masks, heatmaps and objects and write files for people and viewers."""
