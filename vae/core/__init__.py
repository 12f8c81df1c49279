"""The model and its maths: networks, priors, likelihoods, losses, samplers; ships whole."""
