"""microturn: real-time streaming inference server for interaction models.

The repository root is this package: each top-level folder is the subpackage of its name
(`model/` is `microturn.model`, `server/` is `microturn.server`, ...), and `cli.py` is the
`microturn` command. This module holds only the version.
"""

__version__ = "0.1.0"
