"""A throwaway CA for tests: server and client certificates laid out as
QEMU's tls-creds-x509 (a server directory) and libnbd, QEMU and bbctl's
``tls://`` (a client directory) expect them."""

from __future__ import annotations

import subprocess
from pathlib import Path


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


class Pki:
    """A CA under ``root``; :meth:`server` and :meth:`client` issue from it."""

    def __init__(self, root: Path, name: str = "blockbackupd test CA") -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ca_key, self.ca_cert = root / "ca-key.pem", root / "ca-cert.pem"
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                f"/CN={name}", "-keyout", str(self.ca_key), "-out", str(self.ca_cert))

    def _issue(self, directory: Path, role: str, cn: str, ext: str) -> Path:
        directory.mkdir(parents=True)
        key, cert = directory / f"{role}-key.pem", directory / f"{role}-cert.pem"
        csr, extfile = directory / f"{role}.csr", directory / f"{role}.ext"
        extfile.write_text(ext)
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
                "-keyout", str(key), "-out", str(csr))
        openssl("x509", "-req", "-in", str(csr), "-CA", str(self.ca_cert), "-CAkey",
                str(self.ca_key), "-CAcreateserial", "-days", "1", "-extfile", str(extfile),
                "-out", str(cert))
        csr.unlink()
        extfile.unlink()
        (directory / "ca-cert.pem").write_bytes(self.ca_cert.read_bytes())
        key.chmod(0o600)
        return directory

    def server(self, directory: Path, addresses: tuple[str, ...] = ("127.0.0.1",),
               names: tuple[str, ...] = ("localhost",)) -> Path:
        """ca-cert.pem, server-cert.pem, server-key.pem for these IPs and DNS names."""
        san = ",".join([f"IP:{a}" for a in addresses] + [f"DNS:{n}" for n in names])
        return self._issue(directory, "server", "server",
                           f"subjectAltName={san}\nextendedKeyUsage=serverAuth\n")

    def client(self, directory: Path, cn: str = "client") -> Path:
        """ca-cert.pem, client-cert.pem, client-key.pem with this common name."""
        return self._issue(directory, "client", cn, "extendedKeyUsage=clientAuth\n")


def make_pki(root: Path) -> tuple[Path, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate:
    (server directory, client directory)."""
    pki = Pki(root)
    return pki.server(root / "server"), pki.client(root / "client")
