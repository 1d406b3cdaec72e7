"""From a checkpoint to recommendations: the Python API, batch inference, export and reports."""
from rayrec.infer.recommender import Recommender, UnknownItemsError

__all__ = ["Recommender", "UnknownItemsError"]
