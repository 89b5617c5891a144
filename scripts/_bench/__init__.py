"""The multispool benchmark harness (run it with scripts/bench)."""
