"""TaskHub: a pub/sub task hub over WebSocket, as a reusable Django app.

This module holds only the version, so that ``taskhub.client`` imports without Django.
"""

from __future__ import annotations

__version__ = "0.1.0"
