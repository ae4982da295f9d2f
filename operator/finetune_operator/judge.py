"""What only the operator can judge about a spec the apiserver accepted: claims that must exist
and fit the workers, a freeze regex that must compile, and processes that the operator's trainer resources give a GPU
each (pure; the claims are read for it)."""

from __future__ import annotations

from typing import Any

from finetune_operator import api
from finetune_operator import coretypes as core

# Access modes every worker can use at once: all of them read the checkpoints; rank 0 writes.
SHARED_READ = {"ReadOnlyMany", "ReadWriteMany"}
SHARED_WRITE = {"ReadWriteMany"}


def claim_fields(spec: api.FineTuneJobSpec) -> dict[str, tuple[str, bool]]:
    """Each claim a pvc:// URI names: the first field naming it, and whether the trainer writes to it."""
    found: dict[str, tuple[str, bool]] = {}
    prune = spec.rearrange.prune
    heal = prune.heal.dataset if prune and prune.heal and prune.heal.dataset else None  # healing's texts
    teacher = spec.training.distillation.teacher if spec.training.distillation else None
    for field, uri, writes in (("spec.output.uri", spec.output.uri, True), ("spec.model.uri", spec.model.uri, False),
                               ("spec.model.tokenizerUri", spec.model.tokenizer_uri, False),
                               ("spec.dataset.uri", spec.dataset.uri, False),
                               ("spec.rearrange.prune.heal.dataset.uri", heal.uri if heal else None, False),
                               ("spec.training.distillation.teacher.uri", teacher.uri if teacher else None, False)):
        if uri and uri.startswith("pvc://"):
            claim = uri.removeprefix("pvc://").split("/", 1)[0]
            first, wrote = found.get(claim, (field, False))
            found[claim] = (first, wrote or writes)
    return found


def volume_claims(spec: api.FineTuneJobSpec) -> list[tuple[str, str, bool]]:
    """Each claim runtime.volumes mounts: (claim, its field, whether the trainer may write to it). Written unless the
    volume is readOnly or every volumeMount of it is (one with no mount is attached all the same, and only read)."""
    found = []
    for i, volume in enumerate(spec.runtime.volumes):
        if (source := volume.persistent_volume_claim) is None:
            continue
        mounts = [m for m in spec.runtime.volume_mounts if m.name == volume.name]
        writes = not source.read_only and any(not m.read_only for m in mounts)
        found.append((source.claim_name, f"spec.runtime.volumes[{i}].persistentVolumeClaim.claimName", writes))
    return found


def judged_claims(spec: api.FineTuneJobSpec) -> list[tuple[str, str, bool]]:
    """Every claim the workers mount, once per field naming it: (claim, field, whether that field's mount writes).
    The pvc:// URIs' (claim_fields, one entry per claim: the operator mounts each once) and runtime.volumes'."""
    return [(claim, field, writes) for claim, (field, writes) in claim_fields(spec).items()] + volume_claims(spec)


def claim_names(spec: api.FineTuneJobSpec) -> list[str]:
    """The claims to read for spec_problems and missing_claims, each once."""
    return list(dict.fromkeys(claim for claim, _, _ in judged_claims(spec)))


def _absent(field: str, claim: str, pvc: dict[str, Any] | None, namespace: str) -> str | None:
    """Why the claim is not there (yet), else None. One being deleted may be made again (`kubectl delete -f dir/`,
    then `kubectl apply -f dir/`, while its protection finalizer holds it), and is waited for as a missing one; taken
    as it is, the workers' pods waited in Pending for ever."""
    if pvc is None:
        return f"{field}: the PersistentVolumeClaim {claim!r} does not exist in namespace {namespace}"
    if (pvc.get("metadata") or {}).get("deletionTimestamp"):
        return f"{field}: the PersistentVolumeClaim {claim!r} is being deleted"
    return None


def missing_claims(spec: api.FineTuneJobSpec, claims: dict[str, dict[str, Any] | None], namespace: str) -> list[str]:
    """Those of spec_problems that are claims not there (yet)."""
    return [problem for claim, field, _ in judged_claims(spec)
            if (problem := _absent(field, claim, claims.get(claim), namespace))]


def spec_problems(spec: api.FineTuneJobSpec, claims: dict[str, dict[str, Any] | None], namespace: str, *,
                  trainer_gpus: int = 0) -> list[str]:
    """`field: message` for each problem; `claims` maps each claim name (claim_names) to its object (None: absent);
    `trainer_gpus` is a worker's GPUs in the operator's trainer resources, those of a spec that sets no resources.
    A claim named by several fields (a pvc:// URI and a volume, two volumes) is judged once per field, each by what
    its own mount does: its problem names the field to change."""
    problems = []
    for claim, field, writes in judged_claims(spec):
        pvc = claims.get(claim)
        if problem := _absent(field, claim, pvc, namespace):
            problems.append(problem)
            continue
        assert pvc is not None
        if (pvc.get("spec") or {}).get("volumeMode") == "Block":  # the kubelet refused to mount it, told late
            problems.append(f"{field}: claim {claim!r} is a raw block device (volumeMode Block), which no container "
                            "mounts as a folder: use a Filesystem one")
            continue
        if spec.runtime.workers > 1:
            modes = set((pvc.get("spec") or {}).get("accessModes") or [])
            needed = SHARED_WRITE if writes else SHARED_READ
            if not modes & needed:
                problems.append(
                    f"{field}: claim {claim!r} is {', '.join(sorted(modes)) or 'without access modes'}, but the "
                    f"{spec.runtime.workers} workers all need it ({' or '.join(sorted(needed))})")
    if problem := _processes_problem(spec, trainer_gpus):
        problems.append(problem)
    if spec.adjust.freeze.pattern is not None and (problem := spec.adjust.freeze.pattern_problem()):
        problems.append(f"spec.adjust.freeze.pattern: {problem}")
    if problem := spec.model.config_problem():
        problems.append(f"spec.model.config.{problem}")
    return problems


def _processes_problem(spec: api.FineTuneJobSpec, trainer_gpus: int) -> str | None:
    """More processes than GPUs where the operator's trainer resources give them (the apiserver refuses it where the
    spec's runtime.resources do): the trainer refused it, InvalidConfig, only once every worker was scheduled and held
    its GPUs. No GPUs (0) runs the processes on the CPU, as the apiserver's rule allows."""
    rt = spec.runtime
    if rt.resources is not None or not 0 < trainer_gpus < rt.processes_per_worker:
        return None
    return (f"spec.runtime.processesPerWorker: {rt.processes_per_worker} processes per worker, but each worker has "
            f"{trainer_gpus} GPU(s) (the operator's trainer resources {core.GPU}; the spec sets no "
            "runtime.resources): at most one process per GPU; lower it, or set runtime.resources with enough GPUs")
