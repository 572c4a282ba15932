"""nginx reloaded (SIGHUP) while students' IDEs are being used through it: no proxied
request fails, except one on a kept-alive connection the old workers closed, which the
client sends again on a new connection (as a browser does)."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter

import psutil
import pytest
import requests

from lti_tool.ide_access import IDE_COOKIE
from tests.test_proxy import echo_machine, proxied  # noqa: F401  (the fixtures)

pytestmark = pytest.mark.nginx
RELOADS = 5


def test_nginx_reloaded_under_load_no_proxied_request_fails(
    proxied,  # noqa: F811
    echo_machine,  # noqa: F811
):
    machine_id, owner_id, _ = echo_machine
    url = f"{proxied.url}/ide/{machine_id}/api/contents"
    tally: Counter[str] = Counter()
    failures: list[str] = []
    stop = threading.Event()

    def student() -> None:
        with requests.Session() as browser:  # keep-alive, as a browser's
            browser.cookies.set(IDE_COOKIE, proxied.cookie_for(owner_id, machine_id))
            while not stop.is_set():
                for attempt in (1, 2):
                    try:
                        answer = browser.get(url, timeout=10)
                    except requests.ConnectionError as exc:
                        if attempt == 2:
                            failures.append(f"connection failed twice: {exc}")
                        tally["retried"] += 1
                        continue
                    tally[str(answer.status_code)] += 1
                    if answer.status_code != 200 or not answer.json().get("echo"):
                        failures.append(f"{answer.status_code}: {answer.text[:200]}")
                    break

    students = [threading.Thread(target=student) for _ in range(6)]
    for thread in students:
        thread.start()
    master = psutil.Process(proxied.nginx.process.pid)
    workers = {p.pid for p in master.children()}
    time.sleep(1)
    for _ in range(RELOADS):
        master.send_signal(signal.SIGHUP)
        time.sleep(0.6)
    time.sleep(1)
    stop.set()
    for thread in students:
        thread.join(30)
    print(f"requests through {RELOADS} reloads: {dict(tally)}")

    assert not failures, (failures[:5], proxied.nginx.logs())
    assert tally["200"] > 100  # the load was real
    assert not workers & {p.pid for p in master.children()}  # the workers were replaced
