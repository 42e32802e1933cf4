"""keel: a PyTorch trainer, its dashboard and a watchdog as isolated, supervised processes.

The core library imports neither torch nor bokeh; the trainer and dashboard packages do.
"""

__version__ = "0.1.0"
