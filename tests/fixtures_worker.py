"""Session fixtures for the safety worker side (tiny guardrail checkpoint, one shared worker)."""
