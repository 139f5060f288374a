"""Training the interaction model: generated duplex conversations, curricula, the training loop and
its optimisers, the duplex evaluation, export for shipping.

Imports `microturn.model`; never imported by it, nor by `microturn.server` (the layer contract in
pyproject.toml).
"""
