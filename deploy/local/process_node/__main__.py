"""python -m process_node --kubeconfig K --state-dir D [--node-name N]"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from .agent import Agent
from .kubeapi import KubeAPI


def main() -> None:
    parser = argparse.ArgumentParser(prog="process_node", description="Run the pods bound to this node as local processes.")
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True, help="pod folders, logs and volumes go here")
    parser.add_argument("--node-name", default="process-node")
    # The kubelet API (for `kubectl logs`): its serving cert, and the CA its clients' certs need.
    parser.add_argument("--tls-cert-file", type=Path, required=True)
    parser.add_argument("--tls-private-key-file", type=Path, required=True)
    parser.add_argument("--client-ca-file", type=Path, required=True)
    # Advertised, not enforced: realistic manifests (cpu: 8, memory: 32Gi) must schedule here.
    parser.add_argument("--cpu", default="16")
    parser.add_argument("--memory", default="64Gi")
    parser.add_argument("--pods", default="110")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s: %(message)s")
    capacity = {"cpu": args.cpu, "memory": args.memory, "pods": args.pods, "ephemeral-storage": "100Gi"}
    tls = (args.tls_cert_file, args.tls_private_key_file, args.client_ca_file)
    agent = Agent(KubeAPI(args.kubeconfig), args.node_name, args.state_dir.resolve(), capacity, tls)

    def on_sigterm(signum: int, frame: object) -> None:
        agent.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigterm)
    agent.run()


if __name__ == "__main__":
    main()
