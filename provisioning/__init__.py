"""Machines for students: the state machine, claiming, RQ jobs and the backends."""
