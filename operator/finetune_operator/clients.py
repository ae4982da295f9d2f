"""The operator's own API calls (the handlers' reads, creates, deletes and status patches; kopf makes its watches and
the finalizer's patches)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import urllib3
import yaml
from kubernetes import client, config
from kubernetes.config import kube_config
from kubernetes.client.exceptions import ApiException

# Each connect and each wait for the answer's next bytes: a connection the apiserver's end dropped silently (it was
# replaced, a NAT forgot the flow) never answers, and without a limit the handler thread waited for ever.
REQUEST_TIMEOUT_SECONDS = 30.0
# A GET, PUT or DELETE that got no answer (a pooled connection the apiserver had closed, a read timeout) is tried once
# more (a POST or a PATCH never: it may have landed); one answered 413, 429 (the apiserver's priority and fairness) or
# 503 with a Retry-After once more, after that wait or 2 s, whichever is shorter; a failed connect once more.
# urllib3's default tried a GET that timed out 4 times (2 min of a handler thread) and slept a 503's Retry-After (a
# proxy's may say hours) 3 times within the call, outside its timeout, while the tick held the namespace's Warnings
# lock. Beyond these the tick fails, and its timer tries again. (retry_after_max: urllib3 2.8, pyproject.)
RETRIES = urllib3.Retry(total=2, connect=1, read=1, status=1, other=0, status_forcelist=(429,), backoff_factor=0.2,
                        retry_after_max=2, raise_on_status=False)


def load_config() -> None:
    """The kubernetes client's default configuration, found in controller-runtime's order: $KUBECONFIG when set, else
    the pod's ServiceAccount, else ~/.kube/config. The kubernetes client (and kopf's login through it) tries the
    ServiceAccount first: an operator run in a pod with KUBECONFIG naming another cluster (a management cluster's, a
    test cluster's in a CI pod) worked on the pod's own cluster."""
    named = os.environ.get("KUBECONFIG")
    if not named:
        try:
            config.load_incluster_config()
            return
        except config.ConfigException:
            pass
    # Named here: the client reads $KUBECONFIG once, when it is imported (and an empty one names no file).
    paths = named or kube_config.KUBE_CONFIG_DEFAULT_LOCATION or "~/.kube/config"
    config.load_kube_config(paths, context=first_context(paths))


def first_context(paths: str) -> str | None:
    """The current-context kubectl takes from a list of kubeconfigs: the first file's that sets one. The kubernetes
    client's merger takes the last file's, so `KUBECONFIG=a:b` put the operator on another cluster than kubectl."""
    for path in filter(None, paths.split(kube_config.ENV_KUBECONFIG_PATH_SEPARATOR)):
        file = Path(path).expanduser()
        document = yaml.safe_load(file.read_text()) if file.exists() else None
        if isinstance(document, dict) and document.get("current-context"):
            return document["current-context"]
    return None


class Clients:
    """The handful of API calls the handlers make, through the kubernetes client's ApiClient (its configuration,
    auth and connection pool) but not its generated API classes: importing CoreV1Api alone cost the operator
    ~21 MB for good (a pydantic validator for each of its hundreds of methods), BatchV1Api and
    CustomObjectsApi ~3 MB more."""

    def __init__(self, connections: int, timeout: float | None = None, retries: bool = True) -> None:
        """`timeout`: each call's, REQUEST_TIMEOUT_SECONDS by default. `retries`: RETRIES, or none."""
        load_config()
        configuration = client.Configuration.get_default_copy()
        # One connection per handler thread: with urllib3's default of 10, a burst discards connections and
        # pays a TLS handshake for most calls.
        configuration.connection_pool_maxsize = connections
        configuration.retries = RETRIES if retries else False
        self.api = client.ApiClient(configuration)
        self.timeout = REQUEST_TIMEOUT_SECONDS if timeout is None else timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             content_type: str = "application/json", request_timeout: float | None = None,
             accept: str = "application/json", **query: str) -> bytes:
        """The answer's bytes; ApiException for any other status than 2xx, as the generated methods raise it.
        `request_timeout`: this call's, instead of the client's."""
        request = self.api.param_serialize(
            method, path, query_params=list(query.items()), body=body, auth_settings=["BearerToken"],
            header_params={"Accept": accept, "Content-Type": content_type})
        timeout = self.timeout if request_timeout is None else request_timeout
        response = self.api.call_api(*request, _request_timeout=timeout)
        response.read()
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return response.data


def api_path(ns: str | None, plural: str, name: str = "", group: str = "", version: str = "v1") -> str:
    """The path of `plural` in namespace `ns` (of every namespace where `ns` is None), or of one of them, `name`."""
    root = f"/apis/{group}/{version}" if group else f"/api/{version}"
    where = f"{root}/namespaces/{quote(ns, safe='')}" if ns is not None else root
    return f"{where}/{plural}" + (f"/{quote(name, safe='')}" if name else "")
