"""Benchmarks of the composition engine (speed) and of one SVI step (memory); `vtvc bench composition|memory`."""
