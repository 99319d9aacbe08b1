"""Completion sweep and routing: turn complete studies into jobs, by rules that are data.

A rule (``[[routing.rules]]`` in the config, ``daemon.config.RouteRule``) matches a study when
one of its series meets every criterion the rule gives; rules are tried in order, the first
match wins, and a study that matches none is recorded as ``not_routed`` with the reason, for
``pacs-triage status``. ImageType and SliceThickness are read from one file of the series, and
only when a rule asks for them.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Config, RouteRule
from daemon.logs import bound_ids, ref
from storage import completion
from storage.completion import (
    CompletionPolicy,
    CompletionReason,
    NoRoute,
    Route,
    SeriesFacts,
    StudySnapshot,
)
from storage.models import utcnow
from storage.spool import Spool

log = logging.getLogger(__name__)

MAX_DETAIL_CHARS = 1000


@dataclass(frozen=True)
class SeriesView:
    """A series as the rules see it: the database facts plus, lazily, two header attributes."""

    facts: SeriesFacts
    spool: Spool

    @cached_property
    def _header(self) -> tuple[tuple[str, ...], float | None]:
        try:
            ds = dcmread(
                self.spool.path_of(self.facts.sample_path),
                stop_before_pixels=True,
                specific_tags=["ImageType", "SliceThickness"],
            )
        except (OSError, InvalidDicomError, ValueError) as exc:
            log.warning(
                "routing: cannot read %s of series %s: %s",
                self.facts.sample_path,
                self.facts.series_instance_uid,
                exc,
            )
            return (), None
        image_type = tuple(str(v).strip().upper() for v in (ds.get("ImageType") or ()))
        thickness = ds.get("SliceThickness")
        try:
            return image_type, float(thickness) if thickness not in (None, "") else None
        except (TypeError, ValueError):
            return image_type, None

    @property
    def image_type(self) -> tuple[str, ...]:
        return self._header[0]

    @property
    def slice_thickness(self) -> float | None:
        return self._header[1]


def mismatch(rule: RouteRule, series: SeriesView) -> str | None:
    """Why ``series`` does not satisfy ``rule``, or None when it does."""
    f = series.facts
    if rule.modality and (f.modality or "").upper() not in rule.modality:
        return f"Modality {f.modality!r} not in {list(rule.modality)}"
    if rule.body_part and (f.body_part_examined or "").upper() not in rule.body_part:
        return f"BodyPartExamined {f.body_part_examined!r} not in {list(rule.body_part)}"
    if rule.series_description is not None and not re.search(
        rule.series_description, f.series_description or ""
    ):
        return f"SeriesDescription {f.series_description!r} does not match /{rule.series_description}/"
    if rule.calling_ae and not set(f.calling_aes) & set(rule.calling_ae):
        return f"calling AE {list(f.calling_aes)} not in {list(rule.calling_ae)}"
    if rule.min_slices is not None and f.instance_count < rule.min_slices:
        return f"{f.instance_count} instances < min_slices {rule.min_slices}"
    if rule.max_slices is not None and f.instance_count > rule.max_slices:
        return f"{f.instance_count} instances > max_slices {rule.max_slices}"
    if rule.image_type and not set(rule.image_type) <= set(series.image_type):
        return f"ImageType {list(series.image_type)} lacks {list(rule.image_type)}"
    if rule.min_slice_thickness is not None or rule.max_slice_thickness is not None:
        thickness = series.slice_thickness
        if thickness is None:
            return "no SliceThickness"
        if rule.min_slice_thickness is not None and thickness < rule.min_slice_thickness:
            return f"SliceThickness {thickness} < {rule.min_slice_thickness}"
        if rule.max_slice_thickness is not None and thickness > rule.max_slice_thickness:
            return f"SliceThickness {thickness} > {rule.max_slice_thickness}"
    return None


def route(rules: Sequence[RouteRule], snap: StudySnapshot, spool: Spool) -> Route | NoRoute:
    """The first rule one of the study's series satisfies, or why none matched."""
    views = [SeriesView(facts, spool) for facts in snap.series]
    if not views:
        return NoRoute(detail="the study has no instances")
    reasons = []
    for rule in rules:
        why_not = []
        for view in views:
            reason = mismatch(rule, view)
            if reason is None:
                return Route(
                    rule=rule.name,
                    pipeline=rule.pipeline,
                    priority=rule.job_priority,
                    detail=f"series {view.facts.series_instance_uid} matched rule {rule.name!r}",
                )
            why_not.append(reason)
        reasons.append(f"{rule.name}: {'; '.join(sorted(set(why_not)))}")
    if not rules:
        return NoRoute(detail="no routing rules are configured (routing.rules)")
    return NoRoute(detail=("no rule matched: " + " | ".join(reasons))[:MAX_DETAIL_CHARS])


class CompletionSweep:
    """Finds complete studies, routes them and queues their jobs (run by the scheduler)."""

    def __init__(self, config: Config, sessions: sessionmaker[Session], spool: Spool) -> None:
        self.config = config
        self.sessions = sessions
        self.spool = spool
        self.policy = CompletionPolicy(
            quiet_seconds=config.completion.quiet_seconds,
            idle_timeout_seconds=config.completion.idle_timeout_seconds,
            # A receiver aborts an association silent for dicom.network_timeout; one still open
            # after that and the idle timeout belongs to a receiver that died.
            open_association_timeout_seconds=config.dicom.network_timeout
            + config.completion.idle_timeout_seconds,
        )

    def run_once(self, now: dt.datetime | None = None) -> list[completion.Completed]:
        """One pass: reopen studies that raced a completion, then complete what is due."""
        now = now or utcnow()
        for uid in completion.reopen_raced(self.sessions, now):
            log.warning("study %s reopened: an instance was recorded while it was being completed", uid)
        done = []
        for due in completion.due_studies(self.sessions, self.policy, now):
            with bound_ids(study_id=due.study_id):
                done.append(self._complete(due.study_id, due.reason, now))
        return done

    def force(self, study_instance_uid: str) -> completion.Completed:
        """Complete a study now, whatever the timings (``pacs-triage studies complete``)."""
        study_id = completion.find_study(self.sessions, study_instance_uid)
        return self._complete(study_id, CompletionReason.FORCED, utcnow())

    def _complete(self, study_id: int, reason: CompletionReason, now: dt.datetime) -> completion.Completed:
        snap = completion.snapshot(self.sessions, study_id)
        decision = route(self.config.routing.rules, snap, self.spool)
        outcome = completion.complete(
            self.sessions,
            snap,
            decision,
            reason=reason,
            policy=self.policy,
            max_attempts=self.config.workers.max_attempts,
            now=now,
        )
        if outcome.state is None:
            log.debug("study %s not completed: %s", snap.study_instance_uid, outcome.note)
        elif outcome.job_id is not None:
            assert isinstance(decision, Route)
            log.info(
                "study %s complete (%s): job %d queued for %s, priority %s",
                ref(snap.study_instance_uid),
                reason.value,
                outcome.job_id,
                decision.pipeline,
                decision.priority.name,
            )
        else:
            log.info(
                "study %s %s (%s)%s",
                ref(snap.study_instance_uid),
                outcome.state.value,
                reason.value,
                f": {outcome.note}" if outcome.note else "",
            )
        return outcome
