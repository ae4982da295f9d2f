"""kopf's diff base, built from the fields it keeps instead of from a deep copy of the whole body."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import kopf

KEPT_METADATA = ("labels", "annotations", "ownerReferences")  # what kopf's essence reads of the metadata


class SpecDiffBase(kopf.AnnotationsDiffBaseStorage):
    """The same essence as kopf's annotation storage (spec, labels, annotations), stored the same way.

    kopf builds the essence on every watch event by deep-copying the whole body, managedFields and status
    included, then dropping all but the spec and a little metadata: 18.8% of the operator's profile samples in a
    burst of 300 jobs, 6.2% with this (its CPU over that burst did not fall measurably in one round each: 21.6 and
    21.9 s). This hands kopf a body of only those fields, so only they are copied."""

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        if extra_fields:  # a handler that reads other fields: kopf's own way (none of ours does)
            return super().build(body=body, extra_fields=extra_fields)
        metadata = body.get("metadata") or {}
        light: dict[str, Any] = {key: value for key, value in body.items() if key not in ("metadata", "status")}
        light["metadata"] = {key: metadata[key] for key in KEPT_METADATA if key in metadata}
        return super().build(body=kopf.Body(light), extra_fields=extra_fields)
