"""The value types every config section uses: durations, sizes, and strict sections.

Their own module so a topic module (torchrun.py, phases.py, incidents.py, runs.py, endings.py)
and model.py share one definition of each, without importing each other.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer, WithJsonSchema

from keel.config.quantities import format_duration, format_size, parse_duration, parse_size

__all__ = ["Duration", "FieldProblem", "Size", "Strict"]

Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\s*(\d+(\.\d+)?(ms|s|m|h|d)\s*)+$"},
                {"type": "number", "exclusiveMinimum": 0},
            ],
            "description": "A duration: 250ms, 90s, 5m, 1h30m, or seconds as a number.",
        }
    ),
]
Size = Annotated[
    int,
    BeforeValidator(parse_size),
    PlainSerializer(format_size, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*([KMGT]i?B?|B)?\s*$"},
                {"type": "integer", "exclusiveMinimum": 0},
            ],
            "description": "A size: 512MiB, 24GiB, 1.5GB, or bytes as a number.",
        }
    ),
]


class FieldProblem(ValueError):
    """A check across fields of one section; `field` names the key the error is reported at."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class Strict(BaseModel):
    """Every section forbids unknown keys, so a typo is an error, not a silently ignored setting."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=False)
