"""Who may do what: the rules the server asks before it acts on a request. Pure functions.

Roles, in increasing power:

* ``worker`` -- runs tasks, nothing else;
* ``creator`` -- also submits projects, and lists, attaches to, fetches, cancels and releases
  the projects it owns;
* ``admin`` -- everything, on every project, and manages tokens.

A project belongs to the identity (token name) that submitted it. A project id is a name, not
a capability: knowing it grants nothing.
"""

from __future__ import annotations

ROLE_RANK = {"worker": 0, "creator": 1, "admin": 2}


def may_connect_as(token_role: str, connection_role: str) -> bool:
    """Whether a token of ``token_role`` may open a ``worker`` or ``creator`` connection."""
    if token_role not in ROLE_RANK:
        return False
    if connection_role == "worker":
        return True
    return connection_role == "creator" and ROLE_RANK[token_role] >= ROLE_RANK["creator"]


def may_submit(token_role: str) -> bool:
    return ROLE_RANK.get(token_role, -1) >= ROLE_RANK["creator"]


def may_access_project(identity: str, token_role: str, owner: str | None) -> bool:
    """List, attach to, fetch, cancel or release a project owned by ``owner``."""
    if token_role == "admin":
        return True
    return may_submit(token_role) and owner is not None and identity == owner


def refusal(token_role: str, connection_role: str) -> str:
    """Why ``may_connect_as`` said no, for the error the client sees."""
    if token_role == "worker":
        return "a worker token may run tasks only; creating projects needs a creator token"
    return f"a {token_role} token may not connect as a {connection_role}"
