"""kvswitch library: engines, KV features, probe, CoE, policy, schemas, app builder and CLI (no Ray in the math)."""
