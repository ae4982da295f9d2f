"""python -m process_node --kubeconfig K --state-dir D [--node-name N] ..."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from .agent import Agent
from .kubeapi import KubeAPI
from .provisioner import Provisioner


def _taint(text: str) -> dict:
    """key=value:Effect, as the kubelet's --register-with-taints takes it."""
    try:
        key_value, effect = text.rsplit(":", 1)
        key, value = key_value.split("=", 1) if "=" in key_value else (key_value, "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"--register-with-taints {text!r}: expected KEY=VALUE:EFFECT") from None
    return {"key": key, "value": value, "effect": effect}


def main() -> None:
    parser = argparse.ArgumentParser(prog="process_node", description="Run the pods bound to this node as local processes.")
    parser.add_argument("--kubeconfig", type=Path, required=True, help="the node's own (system:node:<name>)")
    parser.add_argument("--state-dir", type=Path, required=True, help="pod folders, logs and volumes go here")
    parser.add_argument("--node-name", default="process-node")
    # The kubelet API (for `kubectl logs`): its serving cert, and the CA its clients' certs need.
    parser.add_argument("--tls-cert-file", type=Path, required=True)
    parser.add_argument("--tls-private-key-file", type=Path, required=True)
    parser.add_argument("--client-ca-file", type=Path, required=True)
    parser.add_argument("--provisioner-kubeconfig", type=Path,
                        help="run the local-path provisioner as this user (none without it)")
    parser.add_argument("--host-path-root", type=Path, action="append", default=[],
                        help="a folder whose subfolders claims may name with the host-path annotation")
    parser.add_argument("--register-with-taints", type=_taint, action="append", default=[], metavar="KEY=VALUE:EFFECT")
    # Advertised, not enforced: realistic manifests (cpu: 8, memory: 32Gi) must schedule here.
    parser.add_argument("--cpu", default="16")
    parser.add_argument("--memory", default="64Gi")
    parser.add_argument("--pods", default="110")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s: %(message)s")
    os.umask(0o077)  # pod folders hold secrets and tokens: the node's own files are private
    state = args.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o700)
    capacity = {"cpu": args.cpu, "memory": args.memory, "pods": args.pods, "ephemeral-storage": "100Gi"}
    tls = (args.tls_cert_file, args.tls_private_key_file, args.client_ca_file)
    provisioner = None
    if args.provisioner_kubeconfig:
        provisioner = Provisioner(KubeAPI(args.provisioner_kubeconfig), state / "volumes", args.host_path_root)
    agent = Agent(KubeAPI(args.kubeconfig), args.node_name, state, capacity, tls, provisioner,
                  args.register_with_taints)

    def on_signal(signum: int, frame: object) -> None:
        sys.exit(128 + signum)  # unwinds Agent.run, which stops the pods on the way out

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    agent.run()


if __name__ == "__main__":
    main()
