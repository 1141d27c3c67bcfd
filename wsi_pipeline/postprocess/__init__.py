"""Post-processing: heatmaps into objects (points, regions) and slide-level figures."""
