"""Health checking: the pure policy, the probes, and the manager that steers the rings."""
