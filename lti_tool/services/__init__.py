"""One module per LTI Advantage service, on a shared token connector (`connector.py`).
No Flask here: workers, the grader and the CLI use them."""
