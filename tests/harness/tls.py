"""Self-signed certificates for TLS tests, made with the openssl CLI (the `cryptography` package is not a
dependency of the project).

    certs = make_certs(tmp_path)   # -> Certs(ca, server_cert, server_key, client_cert, client_key)

The server certificate is valid for 127.0.0.1 and localhost; the client certificate is signed by the same CA
(for mutual TLS).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from harness import require_binary


@dataclass
class Certs:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def _run(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(directory) -> Certs:
    require_binary("openssl")
    d = str(directory)
    os.makedirs(d, exist_ok=True)
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
         "-subj", "/CN=podmeter-test-ca", cwd=d)
    with open(os.path.join(d, "san.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n")
    for name, cn in (("server", "localhost"), ("client", "podmeter-test-client")):
        _run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={cn}", cwd=d)
        _run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    j = lambda n: os.path.join(d, n)  # noqa: E731
    return Certs(j("ca.pem"), j("server.pem"), j("server.key"), j("client.pem"), j("client.key"))
