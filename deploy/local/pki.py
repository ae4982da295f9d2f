"""Certificates and kubeconfigs for the local control plane, made with the openssl CLI.

One CA signs everything: the apiserver's serving cert and a client cert per identity.
Identities follow kubeadm: the controller-manager and scheduler get their own users
(bootstrap RBAC grants them what they need); everything else uses the admin user.
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

# identity -> (common name, organization) of its client certificate.
IDENTITIES = {
    "admin": ("kubernetes-admin", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", ""),
    "scheduler": ("system:kube-scheduler", ""),
}

# The process node's kubelet API (logs) and the apiserver's client cert for calling it.
KUBELET_SANS = ["DNS:localhost", "IP:127.0.0.1"]
KUBELET_CLIENT = ("kube-apiserver-kubelet-client", "system:masters")

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


def make_pki(pki: Path) -> None:
    """CA, apiserver serving cert, client certs and the service-account key pair."""
    pki.mkdir(parents=True, exist_ok=True)
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
    _signed_cert(pki, "kubelet", "/CN=process-node", f"subjectAltName={','.join(KUBELET_SANS)}\nextendedKeyUsage=serverAuth\n")
    for name, (cn, org) in {**IDENTITIES, "apiserver-kubelet-client": KUBELET_CLIENT}.items():
        subject = f"/O={org}/CN={cn}" if org else f"/CN={cn}"
        _signed_cert(pki, name, subject, "extendedKeyUsage=clientAuth\n")
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def still_valid(pki: Path) -> bool:
    """Whether make_pki's files all exist and the CA has a day left (then we keep them)."""
    names = ["ca", "apiserver", "kubelet", "apiserver-kubelet-client", *IDENTITIES]
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
        path = kubeconfig_path(state, cert)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
