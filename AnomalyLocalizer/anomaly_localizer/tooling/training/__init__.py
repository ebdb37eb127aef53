"""Training the networks: VAE, LSR, DAE, the self-supervised detector and brain extraction."""
