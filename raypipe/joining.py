"""Joining a running Ray cluster (RAY_ADDRESS): the two ways it fails before anything starts, each said
in one line at once, instead of Ray's 20 s of connection retries that end in a traceback."""

from __future__ import annotations

import socket
from typing import Optional

from .errors import UserError

TOKEN_HELP = ("set RAY_AUTH_MODE=token and give the cluster's token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
              "or ~/.ray/auth_token (README, \"On a cluster\")")


def gcs_host_port(address: str) -> Optional[tuple[str, int]]:
    """(host, port) of a GCS address such as 10.0.0.5:6379; None for what ray.init resolves itself
    ("auto", "local", ray:// client addresses)."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_cluster_answers(address: Optional[str], timeout: float = 5.0) -> None:
    """Raise UserError when nothing listens at `address` or its cluster refuses this process's token."""
    target = gcs_host_port(address or "")
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=timeout).close()
    except OSError as e:
        raise UserError(f"RAY_ADDRESS={address}: no Ray cluster answers there ({e.strerror or e}); start one "
                        "(`ray start --head`) or correct the address") from None
    try:
        from ray._raylet import GcsClient
        from ray.exceptions import AuthenticationError
    except ImportError:  # another Ray version: ray.init reports it
        return
    try:
        GcsClient(address=address)
    except AuthenticationError:
        raise UserError(f"RAY_ADDRESS={address}: that cluster requires Ray's token authentication and this "
                        f"process sent no valid token: {TOKEN_HELP}") from None
    except Exception:  # anything else (a cluster still starting): ray.init retries and reports it
        return
