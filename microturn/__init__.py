"""microturn: real-time streaming inference server for interaction models.

The importable package maps the repository's top-level folders: `model/` is
`microturn.model`, `server/` is `microturn.server`, `clients/` is
`microturn.clients`. This module holds only the version and the CLI entry.
"""

__version__ = "0.1.0"
