"""Example plug-ins for `python -m trainer` (`entry: "examples.momentum.train:main"`)."""
