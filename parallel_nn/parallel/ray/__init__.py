"""The Ray backend: the same data-parallel step on Ray actors, on one machine or many.

actors.py starts the actors and runs a step (RayEngine); worker.py is the actor; auth.py reaches
a cluster and checks its token."""
