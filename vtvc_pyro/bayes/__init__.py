"""The Pyro program: priors, the composition model, guides, SVI and its checkpoints."""
