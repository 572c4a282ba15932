"""The cloud-init user-data that turns a golden image into one student's machine.

A `#cloud-config` document (https://cloudinit.readthedocs.io/en/latest/reference/modules.html:
users, write_files, runcmd) that adds an unprivileged `student` user and a systemd unit
running the chosen IDE on the private network, at the machine's base URL `/ide/<id>/`.

Anyone on the machine can read its user-data (from the metadata service), so it carries
nothing of the tool: no database or cloud credentials, no `LABPOOL_*` or `OS_*` values.
The IDE token it does carry only opens this machine's IDE, which the student owns anyway;
the proxy adds it to each request, so the browser never sees it.

The student's volume (their persistent files) is attached after boot, when the machine is
handed to its student, possibly long after a warm machine booted. A udev rule written here
starts `labpool-home@<disk>.service` when a second virtio disk appears: it formats the disk
if it is blank, mounts it on /home/student, and restarts the IDE there.
The golden image provides `jupyter` (with JupyterLab) and `code-server` on systemd's PATH
(/usr/local/bin or /usr/bin; a bare name in ExecStart needs systemd 239 or later).

Every IDE refuses a request without the machine's token on the machine itself (the security
group is the second wall, not the only one): Jupyter checks `JUPYTER_TOKEN`; code-server,
whose own login is a cookie form, listens on 127.0.0.1 behind the IDE guard
(`provisioning/ide_guard.py`, written here, run by /usr/bin/python3 as a systemd
DynamicUser), which admits only requests with `Authorization: token <the machine's token>`.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import yaml

from provisioning.ide_config import jupyter_server_config

IDE_KINDS = ("jupyterlab", "code-server", "terminal")
UNIT_NAME = "labpool-ide.service"
GUARD_UNIT_NAME = "labpool-ide-guard.service"
GUARD_SCRIPT = "/usr/local/lib/labpool/ide_guard.py"
GUARD_SOURCE = (Path(__file__).parent / "ide_guard.py").read_text()
ENV_FILE = "/etc/labpool/ide.env"
HOME_SCRIPT = "/usr/local/sbin/labpool-mount-home"
# Any virtio disk after the root disk is the student's volume (only one is ever attached).
HOME_UDEV_RULE = (
    'ACTION=="add", SUBSYSTEM=="block", KERNEL=="vd[b-z]", ENV{DEVTYPE}=="disk", '
    'TAG+="systemd", ENV{SYSTEMD_WANTS}+="labpool-home@%k.service"\n'
)
HOME_UNIT = """[Unit]
Description=Mount the student's volume %I as their home
After=local-fs.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/labpool-mount-home /dev/%I
"""
HOME_MOUNT = """#!/bin/sh
# Mount a newly attached student volume on /home/student; format it only if it is blank.
set -eu
disk="$1"
if ! blkid "$disk" >/dev/null 2>&1; then
    mkfs.ext4 -q -L labpool-home "$disk"
    fresh=1
else
    fresh=0
fi
mkdir -p /home/student
mountpoint -q /home/student || mount "$disk" /home/student
if [ "$fresh" = 1 ]; then cp -a /etc/skel/. /home/student/ 2>/dev/null || true; fi
chown student:student /home/student
systemctl restart labpool-ide.service
"""
# secrets.token_urlsafe's alphabet: nothing that could break out of the env file or the YAML.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")
# 'self' and origins, space-separated: nothing that could end the CSP directive or the
# Python string of the Jupyter config it is written into.
_SOURCES = re.compile(r"'self'( [a-z]+://[A-Za-z0-9.:\[\]-]+)*")


def ide_command(machine_id: int, ide_kind: str, port: int) -> str:
    """The IDE's command line; the token reaches Jupyter as $JUPYTER_TOKEN, never in argv."""
    base_url = f"/ide/{machine_id}/"
    if ide_kind == "jupyterlab":
        # IdentityProvider.token defaults to $JUPYTER_TOKEN (argv would be visible to `ps`).
        return (
            f"jupyter lab --ip=0.0.0.0 --port={port} --no-browser --ServerApp.base_url={base_url}"
        )
    if ide_kind == "terminal":
        return (
            f"jupyter server --ip=0.0.0.0 --port={port} --no-browser"
            f" --ServerApp.base_url={base_url} --ServerApp.terminals_enabled=True"
        )
    if ide_kind == "code-server":
        # code-server has no base URL option: the proxy strips /ide/<id>/ before passing the
        # request on. `--auth none` on loopback only: the guard on `port` checks the token.
        return f"code-server --bind-addr 127.0.0.1:{guarded_port(port)} --auth none"
    raise ValueError(f"unknown IDE kind {ide_kind!r}; expected one of {IDE_KINDS}")


def guarded_port(port: int) -> int:
    """Where code-server listens on 127.0.0.1, behind the guard on `port`."""
    return port + 1 if port < 65535 else port - 1


def _guard_unit(machine_id: int, port: int) -> str:
    """The guard runs as a throw-away system user (DynamicUser): the student cannot stop it
    or take its port; systemd reads the root-only env file for it."""
    lines = [
        "[Unit]",
        f"Description=Labpool IDE guard of machine {machine_id}: token check in front of the IDE",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "DynamicUser=yes",
        f"EnvironmentFile={ENV_FILE}",
        f"ExecStart=/usr/bin/python3 {GUARD_SCRIPT} 0.0.0.0:{port} 127.0.0.1:{guarded_port(port)}",
        "Restart=always",
        "RestartSec=2",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def _unit(machine_id: int, ide_kind: str, port: int) -> str:
    uses_token = ide_kind != "code-server"  # code-server's token is the guard's business
    lines = [
        "[Unit]",
        f"Description=Labpool IDE ({ide_kind}) of machine {machine_id}",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "User=student",
        "Group=student",
        "WorkingDirectory=/home/student",
        # systemd reads the file as root before dropping to `student`: it can stay 0600.
        *([f"EnvironmentFile={ENV_FILE}"] if uses_token else []),
        f"ExecStart={ide_command(machine_id, ide_kind, port)}",
        "Restart=always",  # a student who shuts the IDE down from its menu gets it back
        "RestartSec=2",
        "NoNewPrivileges=yes",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the unit file) as literal blocks, so the document reads as written."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def cloud_config(
    machine_id: int,
    ide_kind: str,
    ide_token: str,
    port: int = 8888,
    *,
    frame_ancestors: str = "'self'",
) -> str:
    """The `#cloud-config` document itself (plain text). `frame_ancestors`: who may frame the
    IDE (`lti_tool.framing.frame_ancestors`: the tool and the registered platforms)."""
    if isinstance(machine_id, bool) or not isinstance(machine_id, int) or machine_id <= 0:
        raise ValueError(f"machine id must be a positive integer, not {machine_id!r}")
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1-65535, not {port!r}")
    if not _TOKEN.fullmatch(ide_token):
        raise ValueError("the IDE token must be 16-128 URL-safe characters")
    if not _SOURCES.fullmatch(frame_ancestors):
        raise ValueError(f"not a CSP source list: {frame_ancestors!r}")
    guarded = ide_kind == "code-server"
    variable = "IDE_GUARD_TOKEN" if guarded else "JUPYTER_TOKEN"
    files = [
        {
            "path": ENV_FILE,
            "owner": "root:root",
            "permissions": "0600",
            "content": f"{variable}={ide_token}\n",
        },
        {
            "path": f"/etc/systemd/system/{UNIT_NAME}",
            "owner": "root:root",
            "permissions": "0644",
            "content": _unit(machine_id, ide_kind, port),
        },
    ]
    if guarded:
        files += [
            {
                "path": GUARD_SCRIPT,
                "owner": "root:root",
                "permissions": "0644",
                "content": GUARD_SOURCE,
            },
            {
                "path": f"/etc/systemd/system/{GUARD_UNIT_NAME}",
                "owner": "root:root",
                "permissions": "0644",
                "content": _guard_unit(machine_id, port),
            },
        ]
    files += [
        {
            "path": "/etc/jupyter/jupyter_server_config.py",
            "owner": "root:root",
            "permissions": "0644",
            "content": jupyter_server_config(f"frame-ancestors {frame_ancestors}"),
        },
        {
            "path": "/etc/udev/rules.d/90-labpool-home.rules",
            "owner": "root:root",
            "permissions": "0644",
            "content": HOME_UDEV_RULE,
        },
        {
            "path": "/etc/systemd/system/labpool-home@.service",
            "owner": "root:root",
            "permissions": "0644",
            "content": HOME_UNIT,
        },
        {"path": HOME_SCRIPT, "owner": "root:root", "permissions": "0755", "content": HOME_MOUNT},
    ]
    document = {
        # `default` keeps the image's admin user (reached with the key pair, if any);
        # `student` runs the IDE, with no password and no sudo.
        "users": [
            "default",
            {
                "name": "student",
                "gecos": "Labpool student",
                "shell": "/bin/bash",
                "lock_passwd": True,
            },
        ],
        "write_files": files,
        # runcmd runs in the final stage, after the `student` user exists.
        "runcmd": [
            "systemctl daemon-reload",
            "udevadm control --reload",
            *([f"systemctl enable --now {GUARD_UNIT_NAME}"] if guarded else []),
            f"systemctl enable --now {UNIT_NAME}",
        ],
    }
    body = yaml.dump(document, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
    return f"#cloud-config\n# Labpool machine {machine_id}: {ide_kind} on port {port}\n{body}"


def user_data(
    machine_id: int,
    ide_kind: str,
    ide_token: str,
    port: int = 8888,
    *,
    frame_ancestors: str = "'self'",
) -> str:
    """The user-data for Nova's `POST /servers`: the cloud-config, base64-encoded (Nova takes
    user_data only as base64, at most 64 KiB)."""
    text = cloud_config(machine_id, ide_kind, ide_token, port, frame_ancestors=frame_ancestors)
    return base64.b64encode(text.encode()).decode("ascii")
