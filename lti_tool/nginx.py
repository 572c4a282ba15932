"""Rendering deploy/nginx.conf.template for this installation (`labpool nginx-config`)."""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path
from urllib.parse import urlsplit

from config.settings import Settings
from lti_tool.ide_access import proxy_secret

TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf.template"


def render_server(
    settings: Settings,
    *,
    tool_upstream: str,
    listen: str | None = None,
    auth_cache_s: int = 5,
    cache_dir: Path | None = None,
) -> str:
    """The server block (plus maps and upstream) for the http context."""
    public = urlsplit(settings.public_url)
    # nginx's own state folder: its workers can write there, on whatever host nginx runs.
    cache_dir = cache_dir or Path("/var/lib/nginx/labpool-auth")
    if auth_cache_s > 0:
        cache_path = (
            f"proxy_cache_path {cache_dir} levels=1:2 keys_zone=labpool_auth:10m "
            "max_size=50m inactive=60s use_temp_path=off;\n"
        )
        cache = (
            "        # Positive answers are reused briefly, per machine and cookie.\n"
            "        proxy_cache labpool_auth;\n"
            # The answer depends on the request's origin, method and upgrade too: a cached
            # yes for a same-origin GET must never admit a cross-origin POST or WebSocket.
            '        proxy_cache_key "$labpool_machine|$cookie_labpool_ide|$request_method|'
            '$http_origin|$http_sec_fetch_site|$http_upgrade";\n'
            f"        proxy_cache_valid 200 {auth_cache_s}s;\n"
            "        proxy_cache_valid any 0;\n"
        )
    else:
        cache_path, cache = "", ""
    values = {
        "listen": listen or str(public.port or (443 if public.scheme == "https" else 80)),
        "server_name": public.hostname or "_",
        "tool_upstream": tool_upstream,
        "proxy_secret": proxy_secret(settings),
        "auth_cache_path": cache_path,
        "auth_cache": cache,
    }
    text = TEMPLATE.read_text()
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", value)
    return text


def render_standalone(settings: Settings, *, prefix: Path, **kwargs: object) -> str:
    """A whole nginx.conf whose pid, logs and temp files live under `prefix` (tests, and the
    single-server mode on a host without a system nginx)."""
    prefix = prefix.resolve()
    for sub in ("logs", "tmp", "auth-cache"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    server = render_server(settings, cache_dir=prefix / "auth-cache", **kwargs)  # type: ignore[arg-type]
    user = ""
    if os.geteuid() == 0:
        # Started by root, nginx's workers drop to the proxy group's user: that group, and
        # no student, may open the IDEs' sockets (provisioning/sandbox.py).
        try:
            entry = pwd.getpwnam(settings.proxy_group)
        except KeyError:
            entry = None
        if entry is not None:
            user = f"user {entry.pw_name} {grp.getgrgid(entry.pw_gid).gr_name};\n"
            prefix.chmod(prefix.stat().st_mode | 0o111)
            for sub in ("tmp", "auth-cache"):
                os.chown(prefix / sub, entry.pw_uid, entry.pw_gid)
    return f"""{user}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {prefix}/logs/access.log;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
{server}
}}
"""
