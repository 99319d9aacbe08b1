"""Routing rules: which studies go to which pipeline, at which priority, to which destinations."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from daemon.config.base import AETitle, Name, Regex, _Section
from daemon.config.delivery import Content
from vocabulary import Priority, PriorityName


class RouteReceives(_Section):
    """``[[routing.rules.send]]``: what one destination receives of this rule's results."""

    destination: Name
    receives: tuple[Content, ...] = Field(min_length=1)  # e.g. ["hl7_oru", "hl7_priority"]


class RouteRule(_Section):
    """A study matches when one of its series matches every criterion given (criteria left out match all).

    Rules are tried in order; the first match routes the study to ``pipeline`` at ``priority``.
    """

    name: Name
    pipeline: Name
    priority: PriorityName = "routine"
    destinations: tuple[Name, ...] = ()  # destination names; empty: every configured destination
    # Per destination, what it receives from this rule; a destination not listed receives its own
    # ``receives`` (by default: DICOM every object, HL7 the ORU, FHIR the Bundle).
    send: tuple[RouteReceives, ...] = ()
    modality: tuple[str, ...] = ()  # any of these (e.g. ["CT"])
    body_part: tuple[str, ...] = ()  # BodyPartExamined, any of these (e.g. ["CHEST", "ABDOMEN"])
    series_description: Regex | None = None  # regular expression searched in SeriesDescription
    image_type: tuple[str, ...] = ()  # every value must be in ImageType (e.g. ["ORIGINAL", "PRIMARY"])
    min_slices: int | None = Field(default=None, ge=1)
    max_slices: int | None = Field(default=None, ge=1)
    min_slice_thickness: float | None = Field(default=None, ge=0)  # mm
    max_slice_thickness: float | None = Field(default=None, ge=0)  # mm
    calling_ae: tuple[AETitle, ...] = ()  # the series came from one of these AE titles

    @field_validator("modality", "body_part", "image_type")
    @classmethod
    def _upper(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(v.strip().upper() for v in values)

    @model_validator(mode="after")
    def _send(self) -> RouteRule:
        named = [s.destination for s in self.send]
        repeated = sorted({n for n in named if named.count(n) > 1})
        if repeated:
            raise ValueError(f"rule {self.name!r}: send lists {', '.join(repeated)} more than once")
        outside = [n for n in named if self.destinations and n not in self.destinations]
        if outside:
            raise ValueError(
                f"rule {self.name!r}: send names {', '.join(outside)}, which is not in its destinations "
                f"({', '.join(self.destinations)})"
            )
        return self

    def receives(self, destination: str) -> tuple[Content, ...] | None:
        """What this rule sends to ``destination``; None: the destination's own ``receives``."""
        return next((s.receives for s in self.send if s.destination == destination), None)

    @model_validator(mode="after")
    def _ranges(self) -> RouteRule:
        for low, high in (("min_slices", "max_slices"), ("min_slice_thickness", "max_slice_thickness")):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"rule {self.name!r}: {low} ({lo}) is greater than {high} ({hi})")
        return self

    @property
    def job_priority(self) -> Priority:
        return Priority.from_name(self.priority)


class RoutingConfig(_Section):
    """Routing rules, tried in order. The embedded default sends every study to the ``echo`` stand-in."""

    rules: tuple[RouteRule, ...] = (RouteRule(name="default", pipeline="echo"),)

    @model_validator(mode="after")
    def _unique(self) -> RoutingConfig:
        names = [r.name for r in self.rules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"rule names must be unique; repeated: {', '.join(duplicates)}")
        return self

    def rule(self, name: str | None) -> RouteRule | None:
        return next((r for r in self.rules if r.name == name), None)
