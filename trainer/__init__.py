"""`python -m trainer`: the isolated training process (see docs/trainer.md). Importing this package does nothing."""
