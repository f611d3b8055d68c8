"""Find a good learning rate with an LR range test, then train with it, tracked in MLflow."""

__version__ = "0.1.0"
