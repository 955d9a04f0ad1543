"""The base of calibflow's config models: one naming rule, and old keys retired gently.

Naming rule (docs/architecture.md#config-naming): every key is snake_case; a clip threshold is
``nsigma`` and its number of passes ``niter``; where the reference (LSST ip_isr / cp_pipe) spells
a setting differently, its name is in the field's description as ``(reference: doBias)``, written
there from :attr:`ConfigModel.reference_names` so it cannot drift.

Keys renamed by that rule keep working for one release: a config, a camera file's ``isr:`` block
or a ``--set`` key that uses the old name is mapped to the new one with a ``FutureWarning`` that
names both (shown to users by default, unlike ``DeprecationWarning``). Unknown keys are refused as
before (``extra="forbid"``).
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ConfigModel", "ClipConfig", "upgrade_keys"]


class ConfigModel(BaseModel):
    """A config model: unknown keys refused, renamed keys accepted for one release with a warning.

    Subclasses list ``reference_names`` (new field -> the reference's spelling: accepted as an old
    key and shown in the description) and ``renamed_keys`` (old calibflow key -> new field).
    """

    model_config = ConfigDict(extra="forbid")

    reference_names: ClassVar[dict[str, str]] = {}
    renamed_keys: ClassVar[dict[str, str]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        own = cls.__dict__.get("reference_names", {})
        changed = False
        for field, ref in own.items():
            info = cls.model_fields[field]          # a KeyError here is a typo in the map itself
            note = f" (reference: {ref})"
            if not (info.description or "").endswith(note):
                info.description = (info.description or "") + note
                changed = True
        if changed:
            cls.model_rebuild(force=True)

    @classmethod
    def old_keys(cls) -> dict[str, str]:
        """Every retired key of this model -> its new name."""
        out = {ref: field for field, ref in cls.reference_names.items() if ref != field}
        out.update(cls.renamed_keys)
        return out

    @model_validator(mode="before")
    @classmethod
    def _retired_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        old = cls.old_keys()
        hits = [k for k in data if k in old]
        if not hits:
            return data
        data = dict(data)
        for key in hits:
            new = old[key]
            warnings.warn(f"config key {cls.__name__}.{key} is renamed {new!r}; the old name is accepted "
                          f"until the next release", FutureWarning, stacklevel=2)
            value = data.pop(key)
            data[new] = value               # the old key was written on purpose: it wins
        return data


class ClipConfig(ConfigModel):
    """A sigma-clipped statistic's two settings, shared by every model that clips."""

    nsigma: float = Field(3.0, gt=0, description="clip half-width, in sigma (afw numSigmaClip)")
    niter: int = Field(3, ge=0, description="clip passes; 0 clips nothing (afw numIter)")


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (``Model``, ``Model | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def upgrade_keys(model: type[BaseModel], data: dict, prefix: str = "") -> tuple[dict, list[tuple[str, str]]]:
    """``data`` (a raw config for ``model``, nested dicts for nested models) with every retired key
    renamed, and the renames as (old, new) dotted keys (``isr.doBias``, ``isr.do_bias``). Nothing is validated here:
    callers validate the result as usual, so unknown keys are still refused there."""
    old = model.old_keys() if issubclass(model, ConfigModel) else {}
    out: dict = {}
    notes: list[tuple[str, str]] = []
    for key, value in data.items():
        new = old.get(key, key)
        if new != key:
            notes.append((f"{prefix}{key}", f"{prefix}{new}"))
        field = model.model_fields.get(new)
        sub = _model_in(field.annotation) if field is not None else None
        if sub is not None and isinstance(value, dict):
            value, more = upgrade_keys(sub, value, f"{prefix}{new}.")
            notes += more
        if new in out and new != key:
            out[new] = value               # the old key was written on purpose: it wins
        else:
            out.setdefault(new, value)
    return out, notes
