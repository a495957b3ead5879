"""Gateway configuration: the one place that reads flags and the environment.

Every setting has a flag and an environment variable; a flag wins over the
variable, the variable over the default. A bad value is reported naming the flag
or variable it came from (``ConfigError``).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nats_adapter import FanoutLimits

from .tracing import check_environment as check_otel_environment

_FANOUT = FanoutLimits()

BACKENDS = ("nats", "redis-sharded", "memory")
#: backends whose gateways talk to each other over a broker: sealed unless told not to
SEALED_BACKENDS = ("nats", "redis-sharded")


#: the shortest API key or Admin UI password accepted
MIN_SECRET_BYTES = 16


class ConfigError(ValueError):
    """A setting has a bad value; the message names the flag or variable."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-socket limits on chat traffic."""

    max_room_chars: int = 128
    max_text_bytes: int = 8 * 1024
    max_rooms_per_socket: int = 100
    #: the engine's max message size: the largest packet a client may send, in bytes
    max_message_bytes: int = 64 * 1024
    #: chat messages per second per socket (token bucket), and the burst allowed
    chat_rate: float = 20.0
    chat_burst: int = 40
    #: join requests per second per socket, and the burst allowed (leaving is never limited)
    join_rate: float = 10.0
    join_burst: int = 150
    #: bytes / packets a socket may have waiting unsent before it is dropped
    max_send_buffer_bytes: int = _FANOUT.max_buffer_bytes
    max_send_queue_packets: int = _FANOUT.max_queued_packets
    #: HTTP publish requests per second per client address, and the burst allowed
    api_rate: float = 50.0
    api_burst: int = 100
    #: seconds an HTTP request body may take to arrive
    body_timeout: float = 10.0
    #: engine.io sessions open at once per client address (0: no cap), and new ones
    #: per second per address, with the burst allowed (loopback is not limited)
    max_sessions_per_address: int = 100
    handshake_rate: float = 5.0
    handshake_burst: int = 50


@dataclass(frozen=True, slots=True)
class Secrets:
    """Credentials, read only from the environment or files, never from flags or logs."""

    jwt_secret: str = field(default="", repr=False)
    api_key: str = field(default="", repr=False)
    nats_user: str = ""
    nats_password: str = field(default="", repr=False)
    nats_tls_ca: str = ""
    redis_username: str = ""
    redis_password: str = field(default="", repr=False)
    redis_tls_ca: str = ""
    #: shared by every gateway; seals the envelopes between them (nats_adapter.sealing)
    cluster_key: str = field(default="", repr=False)
    #: when set, the Socket.IO Admin UI may connect (user "admin", this password)
    admin_password: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    backend: str = "nats"
    nats_urls: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    redis_url: str = "redis://127.0.0.1:7000"
    host: str = "127.0.0.1"
    port: int = 8001
    #: where the other gateways reach this one (http://address:port); empty: the
    #: listening address and port, or this host's address when listening on all
    advertise_url: str = ""
    #: this node's name; by default the host's (see default_node_id)
    node_id: str = field(default_factory=lambda: default_node_id())
    unsubscribe_linger: float = 1.0
    subscribe_timeout: float = 5.0
    #: seconds between heartbeats to the other gateways (cluster API liveness)
    heartbeat_interval: float = 2.0
    #: send presence events (member joined / left) to a room's members
    presence: bool = False
    #: the Admin UI's mode: production (stats only) or development (every socket, event)
    admin_mode: str = "production"
    #: a chat's ack waits for NATS to confirm it read the chat (a PING round)
    confirm_publish: bool = False
    #: Socket.IO connection state recovery across gateways (NATS JetStream)
    recovery: bool = False
    #: seconds a disconnected session stays recoverable
    recovery_window: float = 120.0
    #: export OpenTelemetry traces of chats (gateway/tracing.py; the OTEL_* variables)
    otel: bool = False
    #: a websocket upgrade for a session another gateway owns moves the session here
    #: (else it is spliced to the owner)
    upgrade_move: bool = True
    #: run a multi-node backend without a cluster key (anyone on the broker can forge)
    insecure_bus: bool = False
    cors_origins: tuple[str, ...] = ()
    log_level: str = "INFO"
    #: path of socket.io-client's browser bundle; empty: look in node_modules
    client_js: str = ""
    #: "off", or "jwt": clients must present an HS256 token signed with GATEWAY_JWT_SECRET
    auth: str = "off"
    #: seconds of clock skew allowed on a token's exp/nbf/iat
    jwt_leeway: float = 30.0
    #: the application's backend asked on every CONNECT, and before every join
    connect_proxy: str = ""
    join_proxy: str = ""
    proxy_timeout: float = 1.0
    proxy_headers: tuple[str, ...] = ("cookie", "authorization")
    proxy_cache: float = 5.0
    #: when set, a token's iss / aud must be exactly this
    jwt_issuer: str = ""
    jwt_audience: str = ""
    #: Host headers accepted (host or host:port); empty: any, except on a loopback
    #: address, where only loopback names are (DNS rebinding)
    allowed_hosts: tuple[str, ...] = ()
    #: peers whose X-Forwarded-* headers are believed (a reverse proxy); others' are dropped
    trusted_proxies: tuple[str, ...] = ()
    #: concurrent connections (websockets included); 0: as many as the file limit allows
    max_connections: int = 0
    #: the operator listener (/metrics, detailed /healthz, Admin UI); 0: none, and those
    #: are answered on the public port only to loopback peers or with the API key
    admin_port: int = 0
    admin_host: str = "127.0.0.1"
    limits: Limits = field(default_factory=Limits)
    secrets: Secrets = field(default_factory=Secrets)


# (field, flag, env var, help)
_SETTINGS: list[tuple[str, str, str, str]] = [
    ("backend", "--backend", "GATEWAY_BACKEND", f"broker backend: {', '.join(BACKENDS)}"),
    ("nats_urls", "--nats-url", "NATS_URL", "comma-separated NATS server URLs"),
    ("redis_url", "--redis-url", "REDIS_URL", "a Redis Cluster seed node, redis://host:port"),
    ("host", "--host", "GATEWAY_HOST", "address to listen on"),
    ("port", "--port", "GATEWAY_PORT", "HTTP port to listen on"),
    ("advertise_url", "--advertise-url", "GATEWAY_ADVERTISE_URL",
     "http://address:port where the other gateways reach this one, to serve requests of "
     "sessions it owns (default: --host and --port; this host's address when --host is "
     "0.0.0.0)"),
    ("node_id", "--node-id", "GATEWAY_NODE_ID", "this node's name in /healthz and logs"),
    ("unsubscribe_linger", "--unsubscribe-linger", "GATEWAY_UNSUBSCRIBE_LINGER",
     "seconds a room subscription outlives its last local member"),
    ("subscribe_timeout", "--subscribe-timeout", "GATEWAY_SUBSCRIBE_TIMEOUT",
     "seconds a join waits for the broker to confirm the room's subscription; past it "
     "the join is refused"),
    ("heartbeat_interval", "--heartbeat-interval", "GATEWAY_HEARTBEAT_INTERVAL",
     "seconds between heartbeats to the other gateways; one silent for three is no longer "
     "waited for by cluster-wide calls"),
    ("presence", "--presence", "GATEWAY_PRESENCE",
     "on: tell a room's members when a member joins or leaves (cost grows with members "
     "squared)"),
    ("confirm_publish", "--confirm-publish", "GATEWAY_CONFIRM_PUBLISH",
     "on: a chat is acked ok only once the NATS server answered a PING sent after it "
     "(else: once nats-py sent or buffered it); costs a round trip per ack"),
    ("recovery", "--recovery", "GATEWAY_RECOVERY",
     "on: Socket.IO connection state recovery across gateways (needs --backend nats, "
     "with JetStream)"),
    ("recovery_window", "--recovery-window", "GATEWAY_RECOVERY_WINDOW",
     "seconds a disconnected session stays recoverable"),
    ("otel", "--otel", "GATEWAY_OTEL",
     "on: export OpenTelemetry traces of chats over OTLP/HTTP, set up by the standard "
     "OTEL_* variables (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME ...)"),
    ("upgrade_move", "--upgrade-move", "GATEWAY_UPGRADE_MOVE",
     "on: a websocket upgrade that lands on a gateway other than its session's moves the "
     "session there; off: it is spliced to the owner, which keeps serving it"),
    ("insecure_bus", "--insecure-bus", "GATEWAY_INSECURE_BUS",
     "on: run without GATEWAY_CLUSTER_KEY on a multi-node backend, the bus unsealed "
     "(whoever can publish on the broker can forge any node's messages)"),
    ("admin_mode", "--admin-mode", "GATEWAY_ADMIN_MODE",
     "with GATEWAY_ADMIN_PASSWORD set: production (stats) or development (every socket "
     "and event; costly)"),
    ("cors_origins", "--cors-origins", "GATEWAY_CORS_ORIGINS",
     "comma-separated origins allowed to connect cross-origin ('*' for any)"),
    ("log_level", "--log-level", "GATEWAY_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR"),
    ("client_js", "--client-js", "GATEWAY_CLIENT_JS", "path of socket.io.min.js for the page"),
    ("auth", "--auth", "GATEWAY_AUTH",
     "off, or jwt: sockets must present a JWT signed with GATEWAY_JWT_SECRET"),
    ("jwt_leeway", "--jwt-leeway", "GATEWAY_JWT_LEEWAY",
     "seconds of clock skew allowed on a token's exp, nbf and iat"),
    ("connect_proxy", "--connect-proxy", "GATEWAY_CONNECT_PROXY",
     "URL the application answers on each CONNECT: who the client is, the rooms it may "
     "join, or a refusal (README, Who may connect)"),
    ("join_proxy", "--join-proxy", "GATEWAY_JOIN_PROXY",
     "URL the application answers before each join: allowed, or the reason not"),
    ("proxy_timeout", "--proxy-timeout", "GATEWAY_PROXY_TIMEOUT",
     "seconds the connect and join proxies have to answer; then the request is refused"),
    ("proxy_headers", "--proxy-headers", "GATEWAY_PROXY_HEADERS",
     "comma-separated request headers sent on to the connect proxy"),
    ("proxy_cache", "--proxy-cache", "GATEWAY_PROXY_CACHE",
     "seconds a join proxy's answer is kept per user and room"),
    ("jwt_issuer", "--jwt-issuer", "GATEWAY_JWT_ISSUER", "the iss a token must carry"),
    ("jwt_audience", "--jwt-audience", "GATEWAY_JWT_AUDIENCE", "the aud a token must carry"),
    ("allowed_hosts", "--allowed-hosts", "GATEWAY_ALLOWED_HOSTS",
     "comma-separated Host headers accepted (host or host:port); others get 421"),
    ("trusted_proxies", "--trusted-proxies", "GATEWAY_TRUSTED_PROXIES",
     "comma-separated proxy addresses, or networks (10.0.0.0/8), whose X-Forwarded-* "
     "headers are believed"),
    ("max_connections", "--max-connections", "GATEWAY_MAX_CONNECTIONS",
     "concurrent connections accepted, websockets included (0: the open-file limit)"),
    ("admin_port", "--admin-port", "GATEWAY_ADMIN_PORT",
     "port of the operator listener: /metrics, detailed /healthz, Admin UI (0: none; "
     "then only loopback peers or the API key get them on the public port)"),
    ("admin_host", "--admin-host", "GATEWAY_ADMIN_HOST",
     "address of the operator listener"),
]
_LIMITS: list[tuple[str, str, str, str]] = [
    ("max_room_chars", "--max-room-chars", "GATEWAY_MAX_ROOM_CHARS", "longest room name"),
    ("max_text_bytes", "--max-text-bytes", "GATEWAY_MAX_TEXT_BYTES", "longest chat text (UTF-8)"),
    ("max_rooms_per_socket", "--max-rooms", "GATEWAY_MAX_ROOMS", "rooms one socket may join"),
    ("max_message_bytes", "--max-message-bytes", "GATEWAY_MAX_MESSAGE_BYTES",
     "largest packet a client may send"),
    ("chat_rate", "--chat-rate", "GATEWAY_CHAT_RATE", "chat messages per second per socket"),
    ("chat_burst", "--chat-burst", "GATEWAY_CHAT_BURST", "chat messages a socket may burst"),
    ("join_rate", "--join-rate", "GATEWAY_JOIN_RATE",
     "join requests per second per socket (leave is never limited)"),
    ("join_burst", "--join-burst", "GATEWAY_JOIN_BURST", "join requests a socket may burst"),
    ("max_send_buffer_bytes", "--max-send-buffer", "GATEWAY_MAX_SEND_BUFFER",
     "unsent bytes a socket may hold before it is dropped as a slow consumer"),
    ("max_send_queue_packets", "--max-send-queue", "GATEWAY_MAX_SEND_QUEUE",
     "unsent packets a socket may hold before it is dropped as a slow consumer"),
    ("api_rate", "--api-rate", "GATEWAY_API_RATE",
     "HTTP publish requests per second per client address"),
    ("api_burst", "--api-burst", "GATEWAY_API_BURST",
     "HTTP publish requests a client address may burst"),
    ("body_timeout", "--body-timeout", "GATEWAY_BODY_TIMEOUT",
     "seconds an HTTP request body may take to arrive (then 408)"),
    ("max_sessions_per_address", "--max-sessions-per-address",
     "GATEWAY_MAX_SESSIONS_PER_ADDRESS",
     "engine.io sessions open at once per client address, loopback excepted (0: no cap)"),
    ("handshake_rate", "--handshake-rate", "GATEWAY_HANDSHAKE_RATE",
     "new engine.io sessions per second per client address (loopback excepted)"),
    ("handshake_burst", "--handshake-burst", "GATEWAY_HANDSHAKE_BURST",
     "new engine.io sessions a client address may burst"),
]

# secret -> (environment variable; a variable of the same name + "_FILE" names a file)
_SECRETS: dict[str, str] = {
    "jwt_secret": "GATEWAY_JWT_SECRET",
    "api_key": "GATEWAY_API_KEY",
    "nats_user": "NATS_USER",
    "nats_password": "NATS_PASSWORD",
    "nats_tls_ca": "NATS_TLS_CA",
    "redis_username": "REDIS_USERNAME",
    "redis_password": "REDIS_PASSWORD",
    "redis_tls_ca": "REDIS_TLS_CA",
    "cluster_key": "GATEWAY_CLUSTER_KEY",
    "admin_password": "GATEWAY_ADMIN_PASSWORD",
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _admin_mode(text: str) -> str:
    if text not in ("production", "development"):
        raise ValueError("must be production or development")
    return text


def _on_off(text: str) -> bool:
    if text.lower() in ("on", "1", "true", "yes"):
        return True
    if text.lower() in ("off", "0", "false", "no"):
        return False
    raise ValueError("must be on or off")


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be an integer >= 0")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number 0-65535")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("must be a number >= 0")
    return value


def _backend(text: str) -> str:
    if text not in BACKENDS:
        raise ValueError(f"must be one of {', '.join(BACKENDS)}")
    return text


def _url_list(text: str) -> tuple[str, ...]:
    urls = tuple(u.strip() for u in text.split(",") if u.strip())
    if not urls:
        raise ValueError("must name at least one URL")
    for url in urls:
        if "://" not in url:
            raise ValueError(f"{url!r} is not a URL (nats://host:port)")
    return urls


def _redis_url(text: str) -> str:
    if not text.startswith(("redis://", "rediss://")):
        raise ValueError("must be a redis:// or rediss:// URL")
    return text


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _proxies(text: str) -> tuple[str, ...]:
    """Addresses, or networks with a prefix length (``10.0.0.0/8``)."""
    entries = _csv(text)
    for entry in entries:
        if "/" in entry:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not a network (address/prefix length)") \
                    from None
    return entries


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return level


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be a number > 0")
    return value


def _auth(text: str) -> str:
    if text not in ("off", "jwt"):
        raise ValueError("must be off or jwt")
    return text


def _advertise_url(text: str) -> str:
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.port is None \
            or parsed.path not in ("", "/") or parsed.query or parsed.username:
        raise ValueError("must be http://address:port (no path)")
    return text.rstrip("/")


def _proxy_url(text: str) -> str:
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError("must be an http:// or https:// URL")
    return text


def _node_id(text: str) -> str:
    if not text or len(text) > 64 or not text.isprintable():
        raise ValueError("must be 1-64 printable characters")
    return text


#: the node id of a host without a usable name
FALLBACK_NODE_ID = "gw-1"


def default_node_id() -> str:
    """The node id when neither --node-id nor GATEWAY_NODE_ID is given: the host's
    name. A container's host name is its id, so every replica of a scaled compose
    service (``--scale gateway=4``) or Kubernetes pod gets a name of its own with
    nothing configured."""
    try:
        return _node_id(socket.gethostname()[:64])
    except ValueError:
        return FALLBACK_NODE_ID


_PARSERS: dict[str, Callable[[str], Any]] = {
    "backend": _backend,
    "nats_urls": _url_list,
    "redis_url": _redis_url,
    "host": str,
    "port": _port,
    "advertise_url": _advertise_url,
    "node_id": _node_id,
    "unsubscribe_linger": _non_negative_float,
    "subscribe_timeout": _positive_float,
    "heartbeat_interval": _positive_float,
    "presence": _on_off,
    "admin_mode": _admin_mode,
    "confirm_publish": _on_off,
    "recovery": _on_off,
    "recovery_window": _positive_float,
    "otel": _on_off,
    "upgrade_move": _on_off,
    "insecure_bus": _on_off,
    "cors_origins": _csv,
    "log_level": _log_level,
    "client_js": str,
    "max_room_chars": _positive_int,
    "max_text_bytes": _positive_int,
    "max_rooms_per_socket": _positive_int,
    "max_message_bytes": _positive_int,
    "auth": _auth,
    "chat_rate": _positive_float,
    "chat_burst": _positive_int,
    "join_rate": _positive_float,
    "join_burst": _positive_int,
    "max_send_buffer_bytes": _positive_int,
    "max_send_queue_packets": _positive_int,
    "jwt_leeway": _non_negative_float,
    "connect_proxy": _proxy_url,
    "join_proxy": _proxy_url,
    "proxy_timeout": _positive_float,
    "proxy_headers": _csv,
    "proxy_cache": _non_negative_float,
    "jwt_issuer": str,
    "jwt_audience": str,
    "allowed_hosts": _csv,
    "trusted_proxies": _proxies,
    "max_connections": _non_negative_int,
    "admin_port": _port,
    "admin_host": str,
    "api_rate": _positive_float,
    "api_burst": _positive_int,
    "body_timeout": _positive_float,
    "max_sessions_per_address": _non_negative_int,
    "handshake_rate": _positive_float,
    "handshake_burst": _positive_int,
}


def add_arguments(parser: argparse.ArgumentParser, *, only: Sequence[str] | None = None) -> None:
    """Add the gateway's flags (all, or the fields in ``only``) to ``parser``.

    Values stay strings here; :func:`from_args` parses them so that a bad value is
    reported with the flag or variable it came from.
    """
    for name, flag, env, help_text in [*_SETTINGS, *_LIMITS]:
        if only is not None and name not in only:
            continue
        if _PARSERS[name] is _on_off:  # a switch: the flag alone means on
            parser.add_argument(flag, dest=name, default=None, nargs="?", const="on",
                                metavar="on|off", help=f"{help_text} (env {env})")
            continue
        parser.add_argument(flag, dest=name, default=None, metavar=env,
                            help=f"{help_text} (env {env})")


def _value(name: str, flag: str, env_name: str, args: argparse.Namespace,
           env: Mapping[str, str]) -> Any:
    raw: str | None = getattr(args, name, None)
    source = flag
    if raw is None:
        raw = env.get(env_name)
        source = env_name
    if raw is None:
        return None
    try:
        return _PARSERS[name](raw)
    except ValueError as exc:
        raise ConfigError(f"{source}: invalid value {raw!r}: {exc}") from None


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Build the config from parsed flags, then ``env`` (default ``os.environ``)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for name, flag, env_name, _ in _SETTINGS:
        value = _value(name, flag, env_name, args, env)
        if value is not None:
            values[name] = value
    limit_values: dict[str, Any] = {}
    for name, flag, env_name, _ in _LIMITS:
        value = _value(name, flag, env_name, args, env)
        if value is not None:
            limit_values[name] = value
    limits = Limits(**limit_values)
    if limits.max_message_bytes < limits.max_text_bytes:
        raise ConfigError(
            f"--max-message-bytes ({limits.max_message_bytes}) must be at least "
            f"--max-text-bytes ({limits.max_text_bytes})"
        )
    if values.get("admin_port") and values.get("admin_port") == values.get("port", 8001):
        raise ConfigError("--admin-port must differ from --port (the operator listener is "
                          "not the public one)")
    secrets = read_secrets(env)
    if values.get("auth") == "jwt" and not secrets.jwt_secret:
        raise ConfigError("--auth jwt needs GATEWAY_JWT_SECRET (or GATEWAY_JWT_SECRET_FILE)")
    if secrets.jwt_secret and len(secrets.jwt_secret.encode()) < 32:
        # RFC 7518 3.2: an HS256 key shorter than the hash can be brute-forced
        raise ConfigError("GATEWAY_JWT_SECRET must be at least 32 bytes for HS256")
    for name, var in (("api_key", "GATEWAY_API_KEY"), ("admin_password", "GATEWAY_ADMIN_PASSWORD")):
        secret: str = getattr(secrets, name)
        if secret and len(secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(f"{var} must be at least {MIN_SECRET_BYTES} bytes (a short one "
                              "can be guessed)")
    if values.get("recovery") and values.get("backend", "nats") != "nats":
        raise ConfigError(f"--recovery needs --backend nats (JetStream keeps the sessions and "
                          f"the missed messages); {values['backend']} has no message store")
    if secrets.cluster_key and len(secrets.cluster_key.encode()) < 32:
        raise ConfigError("GATEWAY_CLUSTER_KEY must be at least 32 bytes")
    if values.get("otel"):
        try:
            check_otel_environment(env)
        except ValueError as exc:
            raise ConfigError(f"--otel: {exc}") from None
    return GatewayConfig(**values, limits=limits, secrets=secrets)


def unsealed_bus(config: GatewayConfig) -> str | None:
    """Why ``config`` may not run (a multi-node backend, no cluster key, no
    ``--insecure-bus``); None when it may."""
    if config.backend not in SEALED_BACKENDS or config.secrets.cluster_key or \
            config.insecure_bus:
        return None
    return (f"--backend {config.backend} relays between gateways over the broker: set "
            f"GATEWAY_CLUSTER_KEY (or GATEWAY_CLUSTER_KEY_FILE), a secret of at least 32 "
            f"bytes shared by every gateway, e.g. `python -c 'import secrets; "
            f"print(secrets.token_urlsafe(32))'`; or pass --insecure-bus "
            f"(GATEWAY_INSECURE_BUS=on) to run unsealed, where anyone who can publish on "
            f"the broker can forge any gateway's messages")


def read_secrets(env: Mapping[str, str]) -> Secrets:
    """Each secret from its variable, or from the file its ``*_FILE`` variable names."""
    values: dict[str, str] = {}
    for name, var in _SECRETS.items():
        value = env.get(var, "")
        path = env.get(f"{var}_FILE")
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    value = f.read().strip()
            except OSError as exc:
                raise ConfigError(f"{var}_FILE: cannot read {path!r}: {exc.strerror}") from None
        values[name] = value
    return Secrets(**values)


def describe() -> list[tuple[str, str, str, str]]:
    """(flag, env var, default, meaning) for every setting, for docs."""
    defaults = GatewayConfig()
    limit_defaults = Limits()
    rows = []
    for name, flag, env_name, help_text in _SETTINGS:
        default = getattr(defaults, name)
        if isinstance(default, tuple):
            default = ",".join(default)
        rows.append((flag, env_name, str(default), help_text))
    for name, flag, env_name, help_text in _LIMITS:
        rows.append((flag, env_name, str(getattr(limit_defaults, name)), help_text))
    return rows
