"""Validates audit records against the schema the repository ships (observe/audit.schema.json)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from fqdnproxy.observe import audit

SCHEMA_PATH = Path(audit.__file__).with_name("audit.schema.json")


@cache
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def validate(document: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``document`` is a valid audit record."""
    validator().validate(document)


class RecordingAudit:
    """An audit sink for tests: keeps each record, after checking its JSON against the schema."""

    def __init__(self) -> None:
        self.records: list[audit.AuditRecord] = []

    def emit(self, record: audit.AuditRecord) -> None:
        validate(json.loads(json.dumps(record.to_dict())))
        self.records.append(record)
