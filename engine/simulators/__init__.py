"""Simulated partners for tests and demonstrations (floor 3): the DMP's ITI-41 / ITI-57 endpoint."""
