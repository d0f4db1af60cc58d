"""Clients of a served specdeploy repository: `SpecClient` (generation) and the metrics monitor."""
from specdeploy.client.client import GenerationResult, SpecClient, TextStream, TritonRequestError

__all__ = ["GenerationResult", "SpecClient", "TextStream", "TritonRequestError"]
