"""A user's own training code plugged into keel's trainer; see train.py and docs/trainer.md."""
