"""The realtime server: protocol, sessions and clocks, tick loop, operations (policy, no tensors)."""
