"""What a person looks at: the live page over HTTP (serve.py, api.py, page/), the runs it reads
(runinfo.py), the weights at work on a drawn digit (inference.py), and the pictures of a run
(plot.py)."""
