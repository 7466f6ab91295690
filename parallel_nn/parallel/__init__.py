"""The data-parallel step. What every backend computes the same way (shards.py), what the trainer
sees of a backend (base.py), who applies the update (update.py), the timeline of the processes
(trace.py), and the backends: local/ (worker processes on shared memory, the default) and ray/
(Ray actors), chosen in backends.py. The shortest way in is tutorial/minimal.py."""
