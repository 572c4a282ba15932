"""A fake OpenStack cloud (Keystone v3, Nova v2.1, Cinder v3 subsets) for tests.

Talk to it with the real openstacksdk through the clouds.yaml it writes; steer it with
``FakeCloud`` methods (quota, boot time, injected failures, ERROR servers, lost responses).
With ``FakeCloud(ide="stub")`` (or ``"jupyterlab"``) ACTIVE servers run an IDE on a loopback
fixed IP that answers the openstack backend's health check (``ide.py``).
"""

from .server import NO_VALID_HOST, FakeCloud
from .state import LoggedRequest

__all__ = ["NO_VALID_HOST", "FakeCloud", "LoggedRequest"]
