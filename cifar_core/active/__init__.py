"""Active learning: query strategies that pick which unlabeled images to label next."""
from .strategies import QUERY_STRATEGIES, PoolView, gradient_embeddings, select

__all__ = ["QUERY_STRATEGIES", "PoolView", "gradient_embeddings", "select"]
