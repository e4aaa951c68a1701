"""The throwaway PostgreSQL server of tests/postgres_server.py: usable from two connections, gone after."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tests import postgres_server as pgs


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def test_two_connections_share_the_database_and_exit_cleans_up():
    with pgs.postgres_server(database="search") as url:
        parsed = make_url(url)
        assert (parsed.drivername, parsed.username, parsed.host, parsed.database, parsed.password) == \
            ("postgresql+psycopg2", "postgres", "127.0.0.1", "search", None)
        engine = create_engine(url, poolclass=NullPool)  # every connect() is a new server connection
        try:
            with engine.connect() as writer, engine.connect() as reader:
                pids = {c.execute(text("SELECT pg_backend_pid()")).scalar() for c in (writer, reader)}
                assert len(pids) == 2
                writer.execute(text("CREATE TABLE trials (id serial PRIMARY KEY, value double precision)"))
                writer.execute(text("INSERT INTO trials (value) VALUES (0.875)"))
                writer.commit()
                assert reader.execute(text("SELECT id, value FROM trials")).all() == [(1, 0.875)]
                data_dir = Path(reader.execute(text("SHOW data_directory")).scalar())
                socket_dir = Path(reader.execute(text("SHOW unix_socket_directories")).scalar())
        finally:
            engine.dispose()
        folder = data_dir.parent
        assert socket_dir == folder and folder.is_dir()
        assert _accepts(parsed.port)
    assert not _accepts(parsed.port)
    assert not folder.exists()


def test_server_stopped_and_folder_removed_when_the_body_raises():
    with pytest.raises(ZeroDivisionError):
        with pgs.postgres_server() as url:
            port = make_url(url).port
            engine = create_engine(url, poolclass=NullPool)
            with engine.connect() as conn:  # left open: pg_ctl stop -m fast must still end the server
                folder = Path(conn.execute(text("SHOW data_directory")).scalar()).parent
                1 / 0
    assert not _accepts(port)
    assert not folder.exists()


def test_missing_postgres_is_an_error_saying_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(pgs, "PG_BIN_GLOB", str(tmp_path / "none" / "*" / "bin"))
    with pytest.raises(RuntimeError, match=r"make postgres.*apt-get install postgresql"):
        with pgs.postgres_server():
            pass
