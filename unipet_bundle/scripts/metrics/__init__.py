"""Image-quality metrics shared by the training validation handlers and the evaluation workflow."""
