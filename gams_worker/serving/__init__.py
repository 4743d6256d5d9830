"""While serving: the engine's watchdog and stats, how many jobs at once, the local status endpoint."""
