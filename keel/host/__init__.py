"""The host a process runs on: measuring it (sampling, gpus), handing out its GPUs (gpu_allocation), its dirs (dirs).

Imports nothing of keel but keel.fs (the one flock primitive) and, for a type only,
keel.render.contract; control and host are siblings and never import each other.
"""
