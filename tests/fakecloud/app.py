"""The WSGI application: routing, request log, latency, injected faults, token check,
Nova microversion negotiation, then the handler from ``identity``/``compute``/``network``/
``volume``.

URL layout follows devstack: ``/identity``, ``/compute/v2.1``, ``/networking/v2.0``,
``/volume/v3/{project_id}``.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from . import compute, identity, network, volume
from .replies import Reply, json_reply
from .state import ApiError, CloudState, LoggedRequest, LostResponse, nova_error

Handler = Callable[..., Reply]

# (path, methods, handler, needs a token)
ROUTES: list[tuple[str, list[str], Handler, bool]] = [
    ("/identity/", ["GET"], identity.versions, False),
    ("/identity/v3/", ["GET"], identity.version, False),
    ("/identity/v3/auth/tokens", ["POST"], identity.issue_token, False),
    ("/compute/", ["GET"], compute.versions, False),
    ("/compute/v2.1/", ["GET"], compute.version, False),
    ("/compute/v2.1/servers", ["GET"], compute.list_servers, True),
    ("/compute/v2.1/servers", ["POST"], compute.create_server, True),
    ("/compute/v2.1/servers/detail", ["GET"], compute.list_servers_detail, True),
    ("/compute/v2.1/servers/<server_id>", ["GET"], compute.show_server, True),
    ("/compute/v2.1/servers/<server_id>", ["DELETE"], compute.delete_server, True),
    (
        "/compute/v2.1/servers/<server_id>/os-volume_attachments",
        ["GET"],
        compute.list_attachments,
        True,
    ),
    (
        "/compute/v2.1/servers/<server_id>/os-volume_attachments",
        ["POST"],
        compute.attach_volume,
        True,
    ),
    (
        "/compute/v2.1/servers/<server_id>/os-volume_attachments/<volume_id>",
        ["GET"],
        compute.show_attachment,
        True,
    ),
    (
        "/compute/v2.1/servers/<server_id>/os-volume_attachments/<volume_id>",
        ["DELETE"],
        compute.detach_volume,
        True,
    ),
    ("/compute/v2.1/limits", ["GET"], compute.limits, True),
    ("/networking/", ["GET"], network.versions, False),
    ("/networking/v2.0/", ["GET"], network.version, True),
    ("/networking/v2.0/security-groups", ["GET"], network.list_groups, True),
    ("/networking/v2.0/security-groups", ["POST"], network.create_group, True),
    ("/networking/v2.0/security-groups/<group_id>", ["GET"], network.show_group, True),
    ("/networking/v2.0/security-groups/<group_id>", ["DELETE"], network.delete_group, True),
    ("/networking/v2.0/security-group-rules", ["GET"], network.list_rules, True),
    ("/networking/v2.0/security-group-rules", ["POST"], network.create_rule, True),
    ("/networking/v2.0/security-group-rules/<rule_id>", ["GET"], network.show_rule, True),
    ("/networking/v2.0/security-group-rules/<rule_id>", ["DELETE"], network.delete_rule, True),
    ("/volume/", ["GET"], volume.versions, False),
    ("/volume/v3/", ["GET"], volume.version, False),
    ("/volume/v3/<project_id>/volumes", ["GET"], volume.list_volumes, True),
    ("/volume/v3/<project_id>/volumes/detail", ["GET"], volume.list_volumes, True),
    ("/volume/v3/<project_id>/volumes", ["POST"], volume.create_volume, True),
    ("/volume/v3/<project_id>/volumes/<volume_id>", ["GET"], volume.show_volume, True),
    ("/volume/v3/<project_id>/volumes/<volume_id>", ["DELETE"], volume.delete_volume, True),
]


def _error_reply(err: ApiError) -> Reply:
    return json_reply(err.body(), err.status, err.headers)


class FakeCloudApp:
    """WSGI callable serving one ``CloudState``."""

    def __init__(self, state: CloudState):
        self.state = state
        self.url_map = Map(strict_slashes=False)
        self.handlers: dict[str, tuple[Handler, bool]] = {}
        for i, (path, methods, handler, needs_token) in enumerate(ROUTES):
            endpoint = f"{i}:{handler.__name__}"
            self.url_map.add(Rule(path, methods=methods, endpoint=endpoint))
            self.handlers[endpoint] = (handler, needs_token)

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        req = Request(environ)
        return self.handle(req)(environ, start_response)

    # -- pipeline -------------------------------------------------------------------
    def handle(self, req: Request) -> Response:
        adapter = self.url_map.bind_to_environ(req.environ)
        route, args, endpoint, allowed = "<unrouted>", {}, None, True
        try:
            rule, args = adapter.match(return_rule=True)
            route, endpoint = rule.rule.rstrip("/"), rule.endpoint
        except NotFound:
            pass
        except MethodNotAllowed:
            allowed = False
        except HTTPException as exc:  # e.g. a slash redirect; answer it as werkzeug would
            return exc.get_response(req.environ)  # type: ignore[return-value]
        with self.state.lock:
            self.state.request_log.append(LoggedRequest(req.method, req.path, req.args.to_dict()))
            self.state.counts[(req.method, route)] += 1
            latency = self.state.config.latency + self.state.take_stall(req.method, req.path)
        if latency > 0:
            time.sleep(latency)
        base = req.host_url.rstrip("/")
        service = req.path.strip("/").split("/", 1)[0]
        headers: dict[str, str] = {}
        try:
            with self.state.lock:
                rule = self.state.take_fail_rule(req.method, req.path)
            if rule is not None:
                raise self._injected(rule, service)
            if endpoint is None:
                raise nova_error(
                    404 if allowed else 405, f"fakecloud: no route for {req.method} {req.path}"
                )
            handler, needs_token = self.handlers[endpoint]
            if needs_token:
                self._check_token(req, base, args)
            if service == "compute" and needs_token:
                headers = self._negotiate(req)
            elif service == "volume":
                asked = _asked_version(req, "volume")
                headers = {
                    "OpenStack-API-Version": f"volume {asked or '3.0'}",
                    "Vary": "OpenStack-API-Version",
                }
            with self.state.lock:
                reply = handler(self.state, req, base, **args)
            reply.headers.extend(headers)
            return reply
        except ApiError as err:
            reply = _error_reply(err)
            reply.headers.extend(headers)
            return reply
        except LostResponse as lost:
            return self._lose(req, lost.mode)

    def _injected(self, rule: Any, service: str) -> ApiError:
        message = rule.message or f"fakecloud: injected HTTP {rule.status}"
        if service == "identity":
            return ApiError(rule.status, "error", message, rule.headers)
        if service == "networking":
            return ApiError(rule.status, "NeutronError", message, rule.headers)
        return nova_error(rule.status, message, rule.headers)

    def _check_token(self, req: Request, base: str, args: dict[str, Any]) -> None:
        with self.state.lock:
            token = self.state.valid_token(req.headers.get("X-Auth-Token"))
        if token is None:
            raise ApiError(
                401,
                "error",
                identity.UNAUTHORIZED,
                {"WWW-Authenticate": f'Keystone uri="{base}/identity"'},
            )
        if "project_id" in args and args["project_id"] != token.project_id:
            raise nova_error(403, "Policy doesn't allow this project to be accessed.")

    def _negotiate(self, req: Request) -> dict[str, str]:
        """Nova's microversion handling: default 2.1, ``latest`` = max, 406 out of range."""
        maximum = compute.parse_microversion(self.state.config.max_microversion)
        asked = _asked_version(req, "compute") or req.headers.get("X-OpenStack-Nova-API-Version")
        if not asked:
            chosen = (2, 1)
        elif asked.strip().lower() == "latest":
            chosen = maximum
        else:
            try:
                chosen = compute.parse_microversion(asked.strip())
            except ValueError:
                raise nova_error(
                    400,
                    f"API Version String {asked} is of invalid format. "
                    "Must be of format MajorNum.MinorNum.",
                ) from None
            if not (2, 1) <= chosen <= maximum:
                raise nova_error(
                    406,
                    f"Version {asked} is not supported by the API. Minimum is "
                    f"2.1 and maximum is {self.state.config.max_microversion}.",
                )
        req.environ["fakecloud.microversion"] = chosen
        text = f"{chosen[0]}.{chosen[1]}"
        return {
            "OpenStack-API-Version": f"compute {text}",
            "X-OpenStack-Nova-API-Version": text,
            "Vary": "OpenStack-API-Version, X-OpenStack-Nova-API-Version",
        }

    def _lose(self, req: Request, mode: str) -> Response:
        """The server was created, but the client does not learn it."""
        if mode == "reset":
            sock = req.environ.get("werkzeug.socket")
            if isinstance(sock, socket.socket):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)
            # werkzeug treats a ConnectionError from the app as a dropped connection.
            raise ConnectionResetError("fakecloud: lost create response")
        if mode == "500":
            return _error_reply(
                nova_error(
                    500,
                    "Unexpected API Error. Please report this at "
                    "http://bugs.launchpad.net/nova/ and attach the "
                    "Nova API log if possible.",
                )
            )
        return Response(
            "<html><body><h1>502 Bad Gateway</h1></body></html>",
            status=502,
            content_type="text/html",
        )


def _asked_version(req: Request, service: str) -> str | None:
    """The version asked for ``service`` in ``OpenStack-API-Version: compute 2.96, ...``."""
    for part in req.headers.get("OpenStack-API-Version", "").split(","):
        words = part.split()
        if len(words) == 2 and words[0].lower() == service:
            return words[1]
    return None
