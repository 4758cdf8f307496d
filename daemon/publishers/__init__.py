"""Where a session's audio + video go: a LiveKit room, or a local MP4 (development)."""
