"""lipsyncd: the asyncio side (NATS, sessions, publishers). Never runs GPU kernels on the loop."""
