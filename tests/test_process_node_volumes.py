"""The process node's fsGroup handling of volumes (deploy/local/process_node/volumes.py), as the kubelet's
volume.SetVolumeOwnership, and how it reaches what a container left in a volume, never through a symlink out of
it: no cluster needed, only folders."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from conftest import LOCAL

sys.path.insert(0, str(LOCAL))
from process_node.launcher import LaunchError, open_beneath  # noqa: E402
from process_node.volumes import set_ownership  # noqa: E402

GROUP = os.getgid()  # a group this process may hand files to, root or not


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_on_root_mismatch_hands_over_a_claim_a_read_only_mount_left_unwritable(tmp_path: Path) -> None:
    # A job that read the claim handed it to the group read-only (group r-x, setgid); the next job writes its
    # output there. The kubelet's OnRootMismatch checks the permission bits as well as the group.
    claim = tmp_path / "models"
    (claim / "model").mkdir(parents=True)
    set_ownership(claim, GROUP, read_only=True, policy="OnRootMismatch")
    assert _mode(claim) & 0o070 == 0o050
    set_ownership(claim, GROUP, read_only=False, policy="OnRootMismatch")
    assert _mode(claim) & 0o070 == 0o070
    assert _mode(claim / "model") & 0o070 == 0o070


def test_on_root_mismatch_skips_a_claim_already_handed_over(tmp_path: Path) -> None:
    claim = tmp_path / "data"
    (claim / "inner").mkdir(parents=True)
    set_ownership(claim, GROUP, read_only=False, policy="OnRootMismatch")
    (claim / "inner").chmod(0o700)  # not looked at again: the top folder matches
    set_ownership(claim, GROUP, read_only=False, policy="OnRootMismatch")
    assert _mode(claim / "inner") == 0o700
    set_ownership(claim, GROUP, read_only=False, policy=None)  # Always walks every file
    assert _mode(claim / "inner") & 0o070 == 0o070


def test_a_folder_swapped_for_a_symlink_while_handed_over_is_not_followed(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # A container (of another pod on the same claim) swaps a folder for a symlink out of the claim once the node has
    # listed the folder above it: the node (root) must not hand over what the symlink leads to.
    claim, outside = tmp_path / "claim", tmp_path / "outside"
    (claim / "inner").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_text("")
    (outside / "secret").chmod(0o600)
    listings = []
    scandir = os.scandir

    def swapping(path: object) -> object:
        listings.append(path)
        if len(listings) == 2:  # the claim's top was listed; `inner` is next
            (claim / "inner").rename(claim / "moved")
            (claim / "inner").symlink_to(outside)
        return scandir(path)

    with monkeypatch.context() as patch:
        patch.setattr(os, "scandir", swapping)
        set_ownership(claim, GROUP, read_only=False, policy=None)
    assert _mode(outside / "secret") == 0o600


def test_a_sub_path_swapped_for_a_symlink_after_it_was_checked_is_not_mounted(tmp_path: Path) -> None:
    # The launcher reaches the subPath again where it mounts it, never through a symlink.
    (tmp_path / "volume").mkdir()
    (tmp_path / "volume" / "data").symlink_to(tmp_path)
    with pytest.raises(LaunchError, match="data is a symlink"):
        open_beneath(str(tmp_path / "volume"), "data")
