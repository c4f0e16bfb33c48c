"""The feeds' settings, from the environment (read once per process)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


@dataclass
class FeedSettings:
    # Longest wait of one long poll with nothing pending (RFC 8936 §2.4: a bounded wait).
    max_wait: float = field(default_factory=lambda: _float("SCIMLEDGER_FEED_MAX_WAIT", 30.0))
    # How often a waiting poll looks for new SETs.
    poll_check: float = field(default_factory=lambda: _float("SCIMLEDGER_FEED_POLL_CHECK", 0.2))
    # Push: first retry delay, its cap, and after how long failing marks the stream failing.
    retry_base: float = field(default_factory=lambda: _float("SCIMLEDGER_FEED_RETRY_BASE", 1.0))
    retry_max: float = field(default_factory=lambda: _float("SCIMLEDGER_FEED_RETRY_MAX", 300.0))
    failing_after: float = field(
        default_factory=lambda: _float("SCIMLEDGER_FEED_FAILING_AFTER", 600.0)
    )
    push_timeout: float = field(default_factory=lambda: _float("SCIMLEDGER_FEED_PUSH_TIMEOUT", 10))


FEED_SETTINGS = FeedSettings()
