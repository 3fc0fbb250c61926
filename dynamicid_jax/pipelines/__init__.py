"""Pipelines: text-to-image (:class:`StableDiffusion`) and the identity methods built on it."""
