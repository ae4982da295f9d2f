"""Certificates and kubeconfigs for the local control plane, made with the openssl CLI.

One CA signs everything: the serving certs of etcd, the apiserver and the process node's
kubelet API, and a client cert per identity. Identities follow kubeadm: the
controller-manager and scheduler get their own users (bootstrap RBAC grants them what they
need), the process node is `system:node:<name>` in `system:nodes` (so the Node authorizer
and NodeRestriction apply to it), the apiserver has its own certs for etcd and kubelets,
and the local-path provisioner is a user of its own (manifests/ grant it its RBAC).
Everything here is readable by its owner only.
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import yaml

# Names by which in-cluster clients and local users reach the apiserver.
SERVING_SANS = [
    "DNS:localhost",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local",
    "IP:127.0.0.1",
    "IP:10.0.0.1",  # first address of --service-cluster-ip-range: the `kubernetes` Service
]

NODE_NAME = "process-node"
# identity -> (common name, organization) of its client certificate; each gets a kubeconfig.
IDENTITIES = {
    "admin": ("kubernetes-admin", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", ""),
    "scheduler": ("system:kube-scheduler", ""),
    NODE_NAME: (f"system:node:{NODE_NAME}", "system:nodes"),
    "local-path-provisioner": ("finetune:local-path-provisioner", ""),
}
# Client certs the apiserver presents to etcd and to the process node's kubelet API.
APISERVER_CLIENTS = {
    "apiserver-etcd-client": ("kube-apiserver-etcd-client", ""),
    "apiserver-kubelet-client": ("kube-apiserver-kubelet-client", "system:masters"),
}
LOOPBACK_SANS = ["DNS:localhost", "IP:127.0.0.1"]

_DAYS = "30"
_EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _signed_cert(pki: Path, name: str, subject: str, extensions: str) -> None:
    """Write <name>.key and <name>.crt, signed by the CA in `pki`."""
    ext_file = pki / f"{name}.ext"
    ext_file.write_text(extensions)
    _openssl("req", *_EC_KEY, "-subj", subject, "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=pki)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", _DAYS, "-extfile", ext_file.name, "-out", f"{name}.crt", cwd=pki,
    )
    (pki / f"{name}.csr").unlink()
    ext_file.unlink()


def client_cert(pki: Path, name: str, common_name: str, organization: str) -> None:
    subject = f"/O={organization}/CN={common_name}" if organization else f"/CN={common_name}"
    _signed_cert(pki, name, subject, "extendedKeyUsage=clientAuth\n")


def protect(folder: Path) -> None:
    """Owner-only: the folder 0700, every file in it 0600."""
    folder.chmod(0o700)
    for path in folder.iterdir():
        path.chmod(0o700 if path.is_dir() else 0o600)


def make_pki(pki: Path) -> None:
    """CA, serving certs, client certs and the service-account key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    pki.chmod(0o700)
    _openssl(
        "req", "-x509", *_EC_KEY, "-days", _DAYS, "-subj", "/CN=finetune-local-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", "ca.key", "-out", "ca.crt", cwd=pki,
    )
    _signed_cert(
        pki, "apiserver", "/CN=kube-apiserver",
        f"subjectAltName={','.join(SERVING_SANS)}\nextendedKeyUsage=serverAuth\n",
    )
    _signed_cert(pki, "kubelet", f"/O=system:nodes/CN=system:node:{NODE_NAME}",
                 f"subjectAltName={','.join(LOOPBACK_SANS)}\nextendedKeyUsage=serverAuth\n")
    # etcd's one cert serves clients and authenticates it to its peer port.
    _signed_cert(pki, "etcd", "/CN=etcd", f"subjectAltName={','.join(LOOPBACK_SANS)}\n"
                 "extendedKeyUsage=serverAuth,clientAuth\n")
    for name, (cn, org) in {**IDENTITIES, **APISERVER_CLIENTS}.items():
        client_cert(pki, name, cn, org)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    protect(pki)


def still_valid(pki: Path) -> bool:
    """Whether make_pki's files all exist and the CA has a day left (then we keep them)."""
    names = ["ca", "apiserver", "kubelet", "etcd", *APISERVER_CLIENTS, *IDENTITIES]
    if not all((pki / f"{n}.crt").exists() for n in names) or not (pki / "sa.key").exists():
        return False
    check = ["openssl", "x509", "-checkend", "86400", "-noout", "-in", str(pki / "ca.crt")]
    return subprocess.run(check, capture_output=True).returncode == 0


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def kubeconfig_path(state: Path, identity: str) -> Path:
    """`kubeconfig` is the admin's (what people and tests use); others are per component."""
    return state / ("kubeconfig" if identity == "admin" else f"{identity}.kubeconfig")


def write_kubeconfigs(state: Path, pki: Path, server: str) -> None:
    """One self-contained kubeconfig (certs embedded) per identity."""
    for cert in IDENTITIES:
        write_kubeconfig(kubeconfig_path(state, cert), pki, server, cert)


def write_kubeconfig(path: Path, pki: Path, server: str, cert: str) -> None:
    """A kubeconfig for the client cert <cert>.crt/.key (owner-only, as it holds the key)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "finetune-local", "cluster": {
            "server": server, "certificate-authority-data": _b64(pki / "ca.crt")}}],
        "users": [{"name": cert, "user": {
            "client-certificate-data": _b64(pki / f"{cert}.crt"),
            "client-key-data": _b64(pki / f"{cert}.key")}}],
        "contexts": [{"name": "finetune-local", "context": {"cluster": "finetune-local", "user": cert}}],
        "current-context": "finetune-local",
    }
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
