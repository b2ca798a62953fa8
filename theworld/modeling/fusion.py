"""Constants of world-token fusion shared by the model and the collator.

`TheWorldProcessor` writes each sample's world block (`<start_of_world>`, one `<world_soft_token>`
per world token of its clip, `<end_of_world>`); `TheWorld` scatters the projected world embeddings onto
those placeholders, as Gemma 3 does for image tokens. Labels are `IGNORE_INDEX` on every world position.
"""
from __future__ import annotations

IGNORE_INDEX = -100
