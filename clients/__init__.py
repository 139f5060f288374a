"""Clients: Python SDK and CLI, browser demo page, load-testing harness."""
