"""The interaction model and its batched engine (tensors, no asyncio, no clocks).

Never imports `microturn.server` or `microturn.clients`.
"""
