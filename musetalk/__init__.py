"""MuseTalk 1.5 engine: torch only (no asyncio, NATS or LiveKit here)."""
