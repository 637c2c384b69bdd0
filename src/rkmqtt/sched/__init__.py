"""Scheduling: the request lifecycle, the policy, the fair queue, admission and the loop that owns the engine."""
