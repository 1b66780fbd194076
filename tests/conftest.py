"""Shared pytest fixtures: a data cache seeded from ``../shared/data`` and a network guard.

Tests never touch the network: the autouse ``_no_network`` guard makes every connection to a
non-loopback address raise :class:`NetworkAccessError` (loopback and Unix sockets still work,
e.g. for torch.distributed with gloo on localhost). Loaders read their files from
``data_cache``, a temporary folder seeded with copies of the shared data files.
"""

from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")  # before anything imports matplotlib.pyplot

import ipaddress
import shutil
import socket
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_ENV_VAR = "PERTURBX_SHARED_DATA"


class NetworkAccessError(RuntimeError):
    """A test tried to open a connection to a non-loopback address."""


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The shared real-data folder: ``$PERTURBX_SHARED_DATA`` or ``<repo>/../shared/data``."""
    path = Path(os.environ.get(SHARED_DATA_ENV_VAR) or REPO_ROOT.parent / "shared" / "data")
    if not path.is_dir():
        pytest.skip(
            f"shared data folder not found at {path}; place the data files there "
            f"or set {SHARED_DATA_ENV_VAR} to their folder."
        )
    return path


@pytest.fixture(scope="session")
def data_cache(shared_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temporary loader cache (pass it as ``cache_dir``) holding copies of the shared files."""
    cache = tmp_path_factory.mktemp("perturbx_data_cache")
    for source in shared_data_dir.iterdir():
        if source.is_file() and source.name != "README.md":
            shutil.copyfile(source, cache / source.name)  # a copy: the originals stay untouched
    return cache


def _is_loopback(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return False  # any other host name would need DNS, i.e. the network
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _check_address(family: int, address: object) -> None:
    if family not in (socket.AF_INET, socket.AF_INET6):
        return  # AF_UNIX and other local families
    host = address[0] if isinstance(address, tuple) and address else address
    if not _is_loopback(host):
        raise NetworkAccessError(
            f"Test tried to connect to {address!r}; tests must not use the network "
            "(only loopback connections are allowed)."
        )


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_create_connection = socket.create_connection

    def connect(sock: socket.socket, address, *args, **kwargs):
        _check_address(sock.family, address)
        return real_connect(sock, address, *args, **kwargs)

    def connect_ex(sock: socket.socket, address, *args, **kwargs):
        _check_address(sock.family, address)
        return real_connect_ex(sock, address, *args, **kwargs)

    def create_connection(address, *args, **kwargs):
        _check_address(socket.AF_INET, address)  # checked before any DNS lookup
        return real_create_connection(address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "create_connection", create_connection)
