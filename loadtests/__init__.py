"""Load-test client for a running kvswitch (or any OpenAI-compatible) service (load-test issue)."""
