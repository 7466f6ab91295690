"""The local backend: the trainer and W - 1 worker processes on shared-memory weights.

pool.py starts the workers and runs a step (LocalEngine); exchange.py sends a step's messages and
collects the answers; worker.py is the worker process's loop; mailbox.py is what the messages and
answers look like; barrier.py and shm.py are the pipes and shared segments they meet on."""
