"""A throwaway PostgreSQL server on a free loopback port, for tests that need a real database.

Debian's `postgresql` package provides the binaries (`make postgres` installs it; `make test` runs that).
initdb and postgres refuse to run as root, so under root they run as the `postgres` system user, in a
folder under the system temp dir (pytest's tmp_path is inside a root-only folder that user cannot enter).
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from tests.streamlit_server import free_port

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
TOOLS = ("initdb", "pg_ctl", "pg_isready", "createdb")
INSTALL_HINT = ("PostgreSQL not found (initdb, pg_ctl, pg_isready, createdb on PATH or in /usr/lib/postgresql/*/bin): "
                "run `make postgres` (Debian: apt-get install postgresql, as root or with sudo; `make test` does it)")


def pg_bin_dir() -> Path:
    """The folder holding the server tools: the one of PATH's initdb, else Debian's newest version."""
    on_path = shutil.which("initdb")
    dirs = [str(Path(on_path).parent)] if on_path else []
    dirs += sorted(glob.glob(PG_BIN_GLOB), key=lambda d: int(Path(d).parent.name.split(".")[0]), reverse=True)
    for d in dirs:
        if all(os.access(Path(d) / tool, os.X_OK) for tool in TOOLS):
            return Path(d)
    raise RuntimeError(INSTALL_HINT)


class _Cluster:
    """initdb/pg_ctl/... on one data folder, run as the `postgres` user when we are root."""

    def __init__(self, folder: Path, timeout: float):
        self.bin, self.folder, self.timeout = pg_bin_dir(), folder, timeout
        self.data, self.log, self.port = folder / "data", folder / "server.log", free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("tests run as root and initdb refuses root, but there is no `postgres` system "
                                   "user to run it as: reinstall Debian's postgresql (`make postgres`)") from None
            os.chown(folder, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.as_user, str(self.bin / tool), *args], cwd=self.folder, env=self.env,
                              capture_output=True, text=True, timeout=self.timeout)
        if check and proc.returncode != 0:
            raise self.error(f"{tool} {' '.join(args)} failed ({proc.returncode}): "
                             f"{proc.stdout.strip()} {proc.stderr.strip()}")
        return proc

    def error(self, message: str) -> RuntimeError:
        try:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
        except OSError:
            tail = "(no server log)"
        return RuntimeError(f"{message}\nPostgreSQL server log ({self.log}), last lines:\n{tail}")

    def start(self, database: str) -> None:
        self.run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-locale", "-E", "UTF8",
                 "--no-sync")
        # trust, but only the unix socket (in our private folder) and loopback TCP; no fsync: a throwaway
        (self.data / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
        socket_dir = str(self.folder).replace("'", "''")
        with open(self.data / "postgresql.conf", "a") as conf:  # appending keeps the postgres user's ownership
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{socket_dir}'\nfsync = off\n")
        self.run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(int(self.timeout)))
        end = time.monotonic() + self.timeout
        while self.run("pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                       "-d", "postgres", check=False).returncode != 0:
            if time.monotonic() > end:
                raise self.error(f"PostgreSQL did not accept connections on 127.0.0.1:{self.port} "
                                 f"within {self.timeout:.0f} s")
            time.sleep(0.2)
        self.run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", database)

    def stop(self) -> None:
        """pg_ctl stop -m fast; should that fail, kill the postmaster named in postmaster.pid."""
        pid_file = self.data / "postmaster.pid"
        if not pid_file.exists():
            return
        try:
            if self.run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", check=False).returncode == 0:
                return
        except subprocess.TimeoutExpired:
            pass
        try:
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass


@contextmanager
def postgres_server(database: str = "test", timeout: float = 60):
    """Yield the SQLAlchemy URL postgresql+psycopg2://postgres@127.0.0.1:PORT/DATABASE of a fresh server.

    No password (trust auth on loopback only); the unix socket lives in the server's temp folder. At exit
    the server is stopped (pg_ctl stop -m fast) and its folder removed, also when the body raised.
    """
    folder = Path(tempfile.mkdtemp(prefix="cifar-lab-pg-"))
    cluster = None
    try:
        cluster = _Cluster(folder, timeout)
        cluster.start(database)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{cluster.port}/{database}"
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)
