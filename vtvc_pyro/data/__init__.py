"""Data: data set specs, the embedded offline suite, the 8 standard benchmarks and the mini-batch sampler."""
