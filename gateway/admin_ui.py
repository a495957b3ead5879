"""The Socket.IO Admin UI of a gateway: the cluster-wide instrumentation, with a
budget of failed logins per client address."""

from __future__ import annotations

import logging
from typing import Any

from socketio.exceptions import ConnectionRefusedError as Refused

from nats_adapter.admin import ClusterInstrumentedServer

from .chat import REMOTE_KEY
from .limits import MAX_ADDRESSES, RateLimiter, client_key

logger = logging.getLogger(__name__)

#: failed Admin UI logins an address may make in a burst, and per second after it
LOGIN_FAILURE_BURST = 5
LOGIN_FAILURE_RATE = 0.1


class GatewayAdmin(ClusterInstrumentedServer):
    """Past ``LOGIN_FAILURE_BURST`` failed logins, an address is refused (whatever it
    sends, so a right guess does not show) until it earns a try back."""

    def __init__(self, sio: Any, *args: Any, **kwargs: Any) -> None:
        self.failures = RateLimiter(LOGIN_FAILURE_RATE, LOGIN_FAILURE_BURST, MAX_ADDRESSES)
        self.refused = 0
        super().__init__(sio, *args, **kwargs)

    async def admin_connect(self, sid: str, environ: dict[str, Any], client_auth: Any) -> None:
        address = str(environ.get(REMOTE_KEY, "?"))
        if self.failures.exhausted(client_key(address)):
            self.refused += 1
            raise Refused("too many failed logins: try again later")
        try:
            await super().admin_connect(sid, environ, client_auth)
        except Refused:
            self.failures.allow(client_key(address))
            self.refused += 1
            if self.refused == 1 or self.refused % 100 == 0:
                logger.warning("Admin UI login refused for %s (%d refused so far)", address,
                               self.refused)
            raise
