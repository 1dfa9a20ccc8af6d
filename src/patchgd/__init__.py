"""patchgd: train image classifiers end-to-end on very large images with Patch Gradient Descent."""
