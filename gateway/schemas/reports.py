"""Bodies for the intelligence engine's reports: ask for a report over clusters and a time range."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from marshmallow import ValidationError, fields, validate, validates_schema

from ._common import GatewaySchema, one_of, text, uuid

__all__ = ["REPORT_FORMATS", "REPORT_TYPES", "ReportCreateSchema", "TimeRangeSchema"]

REPORT_TYPES = (
    "cluster_health", "resource_utilization", "cost", "security", "compliance", "incidents", "capacity",
)  # fmt: skip
REPORT_FORMATS = ("json", "csv", "pdf", "html", "markdown")
MAX_CLUSTERS = 100
MAX_RANGE = timedelta(days=366)


class TimeRangeSchema(GatewaySchema):
    """``start`` < ``end``, both ISO 8601 with a UTC offset (``Z`` or ``+02:00``), at most 366 days."""

    start = fields.AwareDateTime(format="iso", required=True, metadata={"example": "2025-01-01T00:00:00Z"})
    end = fields.AwareDateTime(format="iso", required=True, metadata={"example": "2025-02-01T00:00:00Z"})

    @validates_schema
    def _ordered(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        start, end = data["start"], data["end"]
        if start >= end:
            raise ValidationError("Must be later than 'start'.", field_name="end")
        if end - start > MAX_RANGE:
            raise ValidationError(f"The range must not exceed {MAX_RANGE.days} days.", field_name="end")


def _unique(ids: list[str]) -> None:
    seen: set[str] = set()
    for cluster_id in ids:
        if cluster_id.lower() in seen:
            raise ValidationError(f"Lists {cluster_id} more than once.")
        seen.add(cluster_id.lower())


class ReportCreateSchema(GatewaySchema):
    """A report to generate."""

    report_type = one_of(REPORT_TYPES, required=True)
    cluster_ids = fields.List(
        uuid(), required=True, validate=[validate.Length(min=1, max=MAX_CLUSTERS), _unique]
    )
    time_range = fields.Nested(TimeRangeSchema, required=True)
    format = one_of(REPORT_FORMATS, metadata={"description": "Default: json."})
    title = text(200, min_length=1)
