"""Test harness shared by tests/ and bench/: RunPod emulator, OpenAI proxy, fake hub, worker process."""
