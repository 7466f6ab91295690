"""The maths of the network, on plain lists of floats: the layers forward and backward
(network.py), the update rules and learning-rate schedules (optim.py), and the check of the
backward pass against finite differences (gradcheck.py). Nothing here knows about processes."""
