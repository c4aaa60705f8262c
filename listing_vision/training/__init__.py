"""`listing-vision train`: fine-tune an image-text model of the registry on the user's pairs
(docs/training.md). `run.train` is the whole command; the modules each do one part."""

from listing_vision.training.errors import Diverged, TrainingError
from listing_vision.training.loop import TrainConfig
from listing_vision.training.run import TrainReport, TrainRequest, train

__all__ = ["Diverged", "TrainConfig", "TrainReport", "TrainRequest", "TrainingError", "train"]
