"""StoredOptions: the base of each method's frozen settings dataclass (what a trained model *is*).

A method's options are written to plans.json with the model (``to_stored``) and are the only input its network is
rebuilt from (``from_stored``): editing a trainer class after training changes what a new training builds, never what
a stored model rebuilds (tests/trainers/test_rebuild_from_stored_settings.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class StoredOptions:
    """Subclass with frozen fields of JSON types (bool, int, float, str, tuples of them, None)."""

    @classmethod
    def legacy_values(cls) -> dict:
        """Values for fields a plans.json written before the field existed lacks: what those models were trained
        with, which may differ from today's default. Fields not named here default to the dataclass default, which
        must then be what older models had."""
        return {}

    def to_stored(self) -> dict:
        """The plans.json block (JSON types: tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_stored(cls, block: dict):
        """The options a stored block describes; keys of other settings in ``block`` are ignored (the block's keys
        and types are checked where it is read: data_checks.check_stored_settings)."""
        names = {f.name for f in fields(cls)}
        values = {**{k: v for k, v in cls.legacy_values().items() if k not in block},
                  **{k: v for k, v in block.items() if k in names}}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
