"""The fault-injection suite (issue 15, item 2): a class starts (students launching against
the fake platform and the fake cloud, real `labpool worker` and `labpool cron` processes),
a fault is injected and ended, and the system must converge within a stated time: every
student who launched on their own live machine whose IDE answers, no duplicate machines, no
orphan servers or volumes, every grade in the gradebook once and the newest. The harness is
`harness.py`; every test here is `slow` (tests/faults/conftest.py)."""
