"""Training data: tiles, point images, annotations and the sources they come from; augmentation."""
