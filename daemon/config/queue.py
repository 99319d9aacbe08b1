"""When a study is complete, how workers lease and retry jobs, and the backoff both queues use."""

from __future__ import annotations

from pydantic import Field, model_validator

from daemon.config.base import _Section
from storage.retry import Backoff


class BackoffConfig(_Section):
    """Exponential backoff with jitter: ``base * factor**(n-1)`` seconds after n failures, capped."""

    base_seconds: float = Field(default=5.0, ge=0)
    factor: float = Field(default=2.0, ge=1)
    max_seconds: float = Field(default=600.0, ge=0)
    jitter: float = Field(default=0.25, ge=0, le=1)  # +/- this fraction, spreads simultaneous retries

    @model_validator(mode="after")
    def _cap(self) -> BackoffConfig:
        if self.max_seconds < self.base_seconds:
            raise ValueError(
                f"max_seconds ({self.max_seconds}) must be >= base_seconds ({self.base_seconds})"
            )
        return self

    def policy(self) -> Backoff:
        return Backoff(
            base_seconds=self.base_seconds,
            factor=self.factor,
            max_seconds=self.max_seconds,
            jitter=self.jitter,
        )


class CompletionConfig(_Section):
    """When a study counts as complete (seconds): released + quiet period, or the idle timeout."""

    quiet_seconds: float = Field(default=10.0, ge=0)  # after the delivering associations were released
    idle_timeout_seconds: float = Field(default=60.0, gt=0)  # no instance for this long, no release needed
    sweep_interval_seconds: float = Field(default=1.0, gt=0)  # how often the scheduler looks

    @model_validator(mode="after")
    def _order(self) -> CompletionConfig:
        if self.quiet_seconds > self.idle_timeout_seconds:
            raise ValueError(
                f"quiet_seconds ({self.quiet_seconds}) must not exceed idle_timeout_seconds "
                f"({self.idle_timeout_seconds})"
            )
        return self


class WorkersConfig(_Section):
    """Analysis workers: ``serve`` starts ``count`` processes (``serve --workers N`` overrides)."""

    count: int = Field(default=1, ge=0, le=64)
    lease_seconds: float = Field(default=60.0, gt=0)  # requeued when its worker stops heartbeating
    heartbeat_seconds: float | None = Field(default=None, gt=0)  # default: a third of lease_seconds
    poll_seconds: float = Field(default=1.0, gt=0)  # idle workers look for work this often
    max_attempts: int = Field(default=5, ge=1)  # transient failures, then the job is dead
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)  # SIGTERM: finish, else give back
    reap_interval_seconds: float = Field(default=5.0, gt=0)
    backoff: BackoffConfig = BackoffConfig()

    @model_validator(mode="after")
    def _heartbeat(self) -> WorkersConfig:
        if self.heartbeat_seconds is not None and self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds}) must be shorter than lease_seconds "
                f"({self.lease_seconds}) or every lease expires"
            )
        return self

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_seconds or self.lease_seconds / 3
