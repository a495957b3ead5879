"""A tiny application backend for the gateway's connect and join proxies.

Run it, then the gateway with ``--connect-proxy http://127.0.0.1:8080/socketio/connect
--join-proxy http://127.0.0.1:8080/socketio/join``::

    python docs/examples/auth_backend.py --port 8080

Clients connect with ``auth: {"session": "<the application's session id>"}`` (a real
application would read its session cookie from ``headers.cookie`` instead). Here
the sessions are a fixed table: ``alice`` may join ``lobby`` and ``ops``;
``mallory`` is refused; anyone else is unknown. The tests use this file as it is.
"""

from __future__ import annotations

import argparse
from typing import Any

from aiohttp import web

#: the application's sessions: session id -> user
SESSIONS = {"s-alice": "alice", "s-mallory": "mallory"}
#: the rooms each user may join
ROOMS = {"alice": ["lobby", "ops"]}
#: users the application has banned, and why
BANNED = {"mallory": "account suspended"}


async def connect(request: web.Request) -> web.Response:
    body: dict[str, Any] = await request.json()
    auth = body.get("auth") if isinstance(body.get("auth"), dict) else {}
    user = SESSIONS.get(str(auth.get("session")))
    if user is None:
        return web.json_response({"reason": "not signed in"}, status=401)
    if user in BANNED:
        return web.json_response({"reason": BANNED[user]}, status=403)
    return web.json_response({"user": user, "rooms": ROOMS.get(user, []),
                              "data": {"display_name": user.title()}})


async def join(request: web.Request) -> web.Response:
    body: dict[str, Any] = await request.json()
    if body.get("room") in ROOMS.get(str(body.get("user")), []):
        return web.json_response({})
    return web.json_response({"reason": f"{body.get('user')} may not join that room"},
                             status=403)


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/socketio/connect", connect)
    app.router.add_post("/socketio/join", join)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    web.run_app(make_app(), host=args.host, port=args.port)
