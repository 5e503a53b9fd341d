"""Old name of serve.client (the edge toolbox), kept while callers move to serve.client."""

from serve.client import FetchResult, Toolbox, model_loss_fn, personalise

__all__ = ["FetchResult", "Toolbox", "model_loss_fn", "personalise"]
