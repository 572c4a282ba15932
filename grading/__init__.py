"""Grading: assignments, submissions, nbgrader autograding and the AGS score outbox.

Not built yet: the walking skeleton (issue 2) provisions machines only. Nothing here is
imported by the running tool.
"""
