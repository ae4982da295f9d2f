"""`finetune-operator run`'s settings: flags over environment over defaults, a bad value names its flag."""

from __future__ import annotations

import argparse
import urllib.parse

import pytest

from finetune_operator import settings


def parse(argv: list[str]) -> settings.Settings:
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    return settings.from_arguments(parser.parse_args(argv))


def test_defaults_watch_the_whole_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in settings.Settings.model_fields:
        monkeypatch.delenv(settings.ENV_PREFIX + name.upper(), raising=False)
    ours = parse([])
    assert ours.namespaces == () and ours.poll_seconds == 2.0 and ours.metrics_port == 8000
    assert ours.trainer_resources.requests["cpu"] == "4"


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_OPERATOR_NAMESPACES", "team-a, team-b")
    monkeypatch.setenv("FINETUNE_OPERATOR_TRAINER_IMAGE", "from-env:1")
    monkeypatch.setenv("FINETUNE_OPERATOR_TRAINER_RESOURCES", '{"limits": {"nvidia.com/gpu": 1}}')
    ours = parse(["--trainer-image", "from-flag:2", "--poll-seconds", "5"])
    assert ours.namespaces == ("team-a", "team-b") and ours.trainer_image == "from-flag:2"
    assert ours.poll_seconds == 5.0 and ours.trainer_resources.limits == {"nvidia.com/gpu": 1}
    assert parse(["--namespace", "x", "--namespace", "y"]).namespaces == ("x", "y")
    # The flag takes what its variable takes: it refused "x,y" as one invalid name.
    assert parse(["--namespace", "x,y", "--namespace", "z"]).namespaces == ("x", "y", "z")


def test_a_bad_value_from_the_environment_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_OPERATOR_POLL_SECONDS", "0")
    with pytest.raises(SystemExit, match="invalid settings: FINETUNE_OPERATOR_POLL_SECONDS: "):
        parse([])
    monkeypatch.setenv("FINETUNE_OPERATOR_TRAINER_RESOURCES", "{nope")
    with pytest.raises(SystemExit, match="invalid settings: FINETUNE_OPERATOR_TRAINER_RESOURCES: not JSON"):
        parse([])


def test_a_trainer_image_with_whitespace_stops_the_operator_naming_its_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Helm value's trailing newline was taken: the apiserver then refused every job's Job, and each job failed
    InvalidSpec, blamed on its spec."""
    monkeypatch.setenv("FINETUNE_OPERATOR_TRAINER_IMAGE", "ghcr.io/x/trainer:1\n")
    with pytest.raises(SystemExit, match=r"invalid settings: FINETUNE_OPERATOR_TRAINER_IMAGE: .*is no image"):
        parse([])
    for image in (" ghcr.io/x/trainer:1", "ghcr.io/x/trainer :1", "ghcr.io/x/trainer:1\x7f", ""):
        with pytest.raises(SystemExit, match="invalid settings: --trainer-image: "):
            parse(["--trainer-image", image])
    assert parse(["--trainer-image", "registry:5000/x/trainer:1"]).trainer_image == "registry:5000/x/trainer:1"


def test_trainer_pod_annotations_are_a_json_object(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_OPERATOR_TRAINER_POD_ANNOTATIONS", '{"prometheus.io/scrape": "true"}')
    assert parse([]).trainer_pod_annotations == {"prometheus.io/scrape": "true"}  # as the chart sets it
    assert parse(["--trainer-pod-annotations", '{"a": "b"}']).trainer_pod_annotations == {"a": "b"}


@pytest.mark.parametrize("argv,flag", [
    (["--poll-seconds", "0"], "--poll-seconds"),
    (["--namespace", "Not_A_Name"], "--namespace"),
    (["--trainer-resources", '{"limits": {"nvidia.com/gpu": "0.5"}}'], "--trainer-resources"),
    (["--trainer-resources", "{nope"], "--trainer-resources"),
    # huge pages cannot be overcommitted: the apiserver refused each job's Job ("Limit must be set ...")
    (["--trainer-resources", '{"requests": {"hugepages-2Mi": "1Gi", "memory": "1Gi"}, "limits": {"memory": "1Gi"}}'],
     "--trainer-resources"),
    # huge pages of part of a page, or beside no cpu or memory: the apiserver refused each job's Job too
    (["--trainer-resources", '{"limits": {"hugepages-2Mi": "3Mi", "memory": "1Gi"}}'], "--trainer-resources"),
    (["--trainer-resources", '{"limits": {"hugepages-2Mi": "4Mi"}}'], "--trainer-resources"),
    (["--trainer-resources", '{"limits": {"gpu": 1}}'], "--trainer-resources"),
    (["--trainer-pod-annotations", '{"no spaces allowed": "x"}'], "--trainer-pod-annotations"),
    (["--trainer-pod-annotations", "[1]"], "--trainer-pod-annotations"),
    # beyond the apiserver's runAsUser and fsGroup: every job failed at its Job's create, InvalidSpec
    (["--trainer-uid", "4294967294"], "--trainer-uid"), (["--trainer-uid", "2147483648"], "--trainer-uid"),
    # names no namespace has (a dot, over 63 characters): the operator watched nothing there, saying nothing
    (["--namespace", "team.a"], "--namespace: .*not a valid namespace name"),
    (["--namespace", "a" * 64], "--namespace"), (["--lease-namespace", "ops.x"], "--lease-namespace"),
    # the metrics server and kopf's /healthz on one port: the second exited with "address already in use"
    (["--metrics-port", "8080", "--liveness-port", "8080"], "--liveness-port: .*the metrics port is 8080 too"),
])
def test_a_bad_value_names_its_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(SystemExit, match=flag):
        parse(argv)


def test_the_largest_uid_the_apiserver_takes_is_taken_and_0_leaves_it_to_the_platform() -> None:
    assert parse(["--trainer-uid", "2147483647"]).trainer_uid == 2147483647
    assert parse(["--trainer-uid", "0"]).trainer_uid == 0
    with pytest.raises(SystemExit, match="--trainer-uid"):
        parse(["--trainer-uid", "-1"])


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "127.0.0.1", "fd00::1"])
def test_the_liveness_endpoint_parses_back_to_the_bind_address(address: str) -> None:
    """kopf splits the URL: an unbracketed IPv6 address (:: for an IPv6-only pod) failed on its port."""
    url = urllib.parse.urlsplit(parse(["--bind-address", address, "--liveness-port", "8081"]).liveness_endpoint)
    assert (url.hostname, url.port, url.path) == (address, 8081, "/healthz")


def test_the_help_gives_each_settings_default() -> None:
    """The README sends a user to `run --help` for the settings; it named none of their defaults (which ports,
    which address, which image and uid)."""
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    helps = {action.dest: action.help for action in parser._actions}
    assert "default 8000" in helps["metrics_port"] and "default 8080" in helps["liveness_port"]
    assert "default 0.0.0.0" in helps["bind_address"] and "default 2.0" in helps["poll_seconds"]
    assert "default 10001" in helps["trainer_uid"] and "default ghcr.io/finetune-dev/trainer:" in helps["trainer_image"]
    assert 'default {"requests": {"cpu": "4"' in helps["trainer_resources"]
    assert "default" not in helps["namespaces"] and "default" not in helps["trainer_pod_annotations"]
