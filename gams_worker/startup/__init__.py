"""Start-up: learn the host, choose settings, start one engine, survive a failed graph capture."""
