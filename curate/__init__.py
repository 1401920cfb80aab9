"""curate: fine-tuning datasets for anime image models, from query to training."""

__version__ = "0.1.0"
