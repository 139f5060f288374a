"""Helpers the tests share: a real server in a thread (`realserver`) and the worker pool's event sink
(`task_events`). Not tests themselves; pytest puts tests/ on sys.path, so they import as `helpers.*`."""
