"""Socket ids that name their node: ``<node tag>:<random>``.

There is no per-socket default room, so a direct message to a sid is routed by
the node tag its sid starts with. Room names of this shape are reserved.

Engine.io session ids name their node the same way (``<node tag><random>``,
:func:`new_eio_sid`), so a gateway that gets a request of a session another one
owns knows where to send it (no load balancer affinity needed).
"""

from __future__ import annotations

import re
import secrets

#: Length of a node tag (``secrets.token_urlsafe(6)``) and of a whole sid.
NODE_TAG_CHARS = 8
SID_CHARS = 21
SID_RE = re.compile(r"[A-Za-z0-9_-]{8}:[A-Za-z0-9_-]{12}")
NODE_TAG_RE = re.compile(r"[A-Za-z0-9_-]{8}")
#: Length of an engine.io session id: the node tag, then 16 random characters.
EIO_SID_CHARS = 24
EIO_SID_RE = re.compile(r"[A-Za-z0-9_-]{24}")


def new_node_tag() -> str:
    """A random tag naming one manager (one node) for the life of its process."""
    return secrets.token_urlsafe(6)


def new_sid(node_tag: str) -> str:
    """A fresh sid owned by the node tagged ``node_tag``."""
    return f"{node_tag}:{secrets.token_urlsafe(9)}"


def is_sid(name: object) -> bool:
    """Whether ``name`` has the shape of a sid issued by a :class:`ClusterManager`."""
    return isinstance(name, str) and len(name) == SID_CHARS and SID_RE.fullmatch(name) is not None


def is_node_tag(name: object) -> bool:
    """Whether ``name`` has the shape of a node tag (:func:`new_node_tag`)."""
    return isinstance(name, str) and NODE_TAG_RE.fullmatch(name) is not None


def sid_owner(sid: str) -> str:
    """The node tag of the node that owns ``sid``."""
    return sid[:NODE_TAG_CHARS]


def new_eio_sid(node_tag: str) -> str:
    """A fresh engine.io session id owned by the node tagged ``node_tag`` (96 random bits)."""
    return node_tag + secrets.token_urlsafe(12)


def eio_sid_owner(eio_sid: object) -> str | None:
    """The node tag an engine.io session id names, or None when it has not the shape
    :func:`new_eio_sid` gives (a session of a node that does not name itself)."""
    if isinstance(eio_sid, str) and len(eio_sid) == EIO_SID_CHARS \
            and EIO_SID_RE.fullmatch(eio_sid) is not None:
        return eio_sid[:NODE_TAG_CHARS]
    return None
