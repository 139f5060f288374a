"""Benchmarks, one module per figure: `engine_capacity` (sessions the engine holds in real time) and
`background_overhead` (tick time with and without background tasks streaming). Each prints a table,
then one JSON object as its last line. The load test against a running server is a client
(`microturn.clients.loadtest`).
"""
