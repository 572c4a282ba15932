"""The shape the design card asks for, checked: workers, the cron and the CLI load no Flask
(only `lti_tool.web` imports it), and every RQ job name the code enqueues resolves to a
function (a renamed module must not leave jobs that fail in the worker)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from lti_tool.services.nrps import SYNC_JOB
from provisioning.queue import RECONCILE_JOB, START_JOB, STOP_JOB

NO_FLASK = """
import sys
{imports}
loaded = sorted(m for m in sys.modules if m == "flask" or m.startswith(("flask.", "lti_tool.web")))
print(",".join(loaded))
"""


@pytest.mark.parametrize(
    "what, imports",
    [
        ("the provisioning jobs", "import provisioning.jobs"),
        ("the reconciler", "import provisioning.reconciler"),
        # What `labpool worker` preloads, and the CLI module every process starts from.
        (
            "the worker",
            "import lti_tool.cli, lti_tool.models, lti_tool.services.nrps, "
            "provisioning.reconciler, provisioning.jobs",
        ),
        ("the roster service", "import lti_tool.services.nrps"),
        ("the runner", "import lti_tool.runner"),
    ],
)
def test_workers_and_the_cli_load_no_flask(what, imports):
    done = subprocess.run(
        [sys.executable, "-c", NO_FLASK.format(imports=imports)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"{what} loads {done.stdout.strip()}"


@pytest.mark.parametrize("job", [START_JOB, STOP_JOB, RECONCILE_JOB, SYNC_JOB])
def test_every_job_name_resolves_to_a_function(job):
    module, _, name = job.rpartition(".")
    assert callable(getattr(importlib.import_module(module), name))
