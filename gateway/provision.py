"""``python -m gateway provision``: the operator's step before gateways run --recovery.

Creates (or brings up to date) the JetStream stream and session bucket the gateways
of a channel prefix use, logged in as an identity that may administer JetStream:
on infra/nats/node-secure.conf the user ``operator`` (gateway users may not). Safe to
run again: what exists is checked and updated, nothing is deleted.

Credentials come from the environment only: NATS_OPERATOR_USER (default
``operator``) and NATS_OPERATOR_PASSWORD, or else NATS_USER and NATS_PASSWORD; none
for a broker without users. NATS_TLS_CA as for ``serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import ssl
import sys
import time
from collections.abc import Mapping
from typing import Any

from nats_adapter.brokers.nats_store import (
    MIN_MAX_BYTES,
    MIN_MAX_MSG_SIZE,
    STREAM_MAX_BYTES,
    STREAM_MAX_MSG_SIZE,
)

from . import config as cfg

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cfg.add_arguments(parser, only=("nats_urls", "recovery_window"))
    parser.add_argument("--prefix", default="sio",
                        help="the gateways' channel prefix (default sio)")
    parser.add_argument("--replicas", type=int, default=3,
                        help="copies of the stream and the bucket (default 3; 1 on a "
                             "single server)")
    parser.add_argument("--max-bytes", type=int, default=STREAM_MAX_BYTES,
                        help="bytes the stream keeps at most, oldest dropped first "
                             f"(default {STREAM_MAX_BYTES}; at least {MIN_MAX_BYTES})")
    parser.add_argument("--max-msg-size", type=int, default=STREAM_MAX_MSG_SIZE,
                        help="bytes of one stored message at most (default "
                             f"{STREAM_MAX_MSG_SIZE}, twice the default --max-message-bytes;"
                             f" at least {MIN_MAX_MSG_SIZE})")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for JetStream to be ready (default 60)")


def credentials(env: Mapping[str, str]) -> dict[str, Any]:
    """nats-py connect options for the operator, from ``env``."""
    options: dict[str, Any] = {}
    password = env.get("NATS_OPERATOR_PASSWORD")
    if password:
        options["user"] = env.get("NATS_OPERATOR_USER") or "operator"
        options["password"] = password
    elif env.get("NATS_PASSWORD"):
        options["user"] = env.get("NATS_USER", "")
        options["password"] = env["NATS_PASSWORD"]
    if env.get("NATS_TLS_CA"):
        options["tls"] = ssl.create_default_context(cafile=env["NATS_TLS_CA"])
    return options


async def provision_nats(urls: list[str], prefix: str, window: float, replicas: int,
                         timeout: float, env: Mapping[str, str],
                         max_bytes: int = STREAM_MAX_BYTES,
                         max_msg_size: int = STREAM_MAX_MSG_SIZE) -> None:
    """Connect as the operator and provision, retrying while JetStream is not ready."""
    import nats
    import nats.errors

    from nats_adapter.brokers.nats_store import provision

    errors: list[Exception] = []

    async def error_cb(exc: Exception) -> None:  # retried below: one line, no traceback
        errors.append(exc)
        logger.debug("NATS: %r", exc)

    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        try:
            nc = await nats.connect(urls, allow_reconnect=False, max_reconnect_attempts=1,
                                    reconnect_time_wait=0.5, connect_timeout=5,
                                    error_cb=error_cb,
                                    name="gateway-provision", **credentials(env))
            try:
                await provision(nc, prefix, window, replicas, max_bytes=max_bytes,
                                max_msg_size=max_msg_size)
            finally:
                await nc.close()
            return
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            if any("authorization" in str(e).lower() for e in [*errors, exc]):
                raise RuntimeError("the NATS server refused the login: check "
                                   "NATS_OPERATOR_USER / NATS_OPERATOR_PASSWORD") from exc
            if any("permissions violation" in str(e).lower() for e in errors):
                raise RuntimeError("this NATS user may not administer JetStream: log in as "
                                   "the operator (NATS_OPERATOR_PASSWORD)") from exc
            if time.monotonic() > deadline:
                raise
            logger.info("JetStream not ready yet (%r); retrying", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s provision %(levelname)s %(name)s: %(message)s")
    try:
        conf = cfg.from_args(args)
    except cfg.ConfigError as exc:
        print(f"gateway provision: error: {exc}", file=sys.stderr)
        return 2
    if args.replicas < 1:
        print("gateway provision: error: --replicas must be at least 1", file=sys.stderr)
        return 2
    for flag, value, floor in (("--max-bytes", args.max_bytes, MIN_MAX_BYTES),
                               ("--max-msg-size", args.max_msg_size, MIN_MAX_MSG_SIZE)):
        if value < floor:
            print(f"gateway provision: error: {flag} must be at least {floor}",
                  file=sys.stderr)
            return 2
    try:
        asyncio.run(provision_nats(list(conf.nats_urls), args.prefix, conf.recovery_window,
                                   args.replicas, args.timeout, os.environ,
                                   args.max_bytes, args.max_msg_size))
    except Exception as exc:  # reported in one line, not a traceback
        print(f"gateway provision: error: could not provision JetStream on "
              f"{','.join(conf.nats_urls)}: {exc!r}", file=sys.stderr)
        return 1
    print(f"provisioned stream and session bucket for prefix {args.prefix!r}", flush=True)
    return 0
