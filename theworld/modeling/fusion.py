"""Per-row insertion of world-token placeholders into a padded batch.

Text marks where a world goes with the pair `<start_of_world><end_of_world>`. Before the language model
runs, each row gets `num_world_tokens` placeholder tokens (`<world_soft_token>`) spliced in between the
pair, at that row's own position. Every row grows by the same amount, so left padding stays left
padding and right padding stays right padding; the model then scatters the projected world embeddings
onto the placeholders (as Gemma 3 does for image tokens).
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def world_marker_positions(input_ids: torch.Tensor, sow_id: int, eow_id: int) -> torch.Tensor:
    """Index of the `<start_of_world>` of each row's unexpanded `<start_of_world><end_of_world>` pair.

    Raises `ValueError` unless every row has exactly one such pair.
    """
    pairs = (input_ids[:, :-1] == sow_id) & (input_ids[:, 1:] == eow_id)
    counts = pairs.sum(dim=1)
    if not bool((counts == 1).all()):
        raise ValueError(
            f"every row needs exactly one '<start_of_world><end_of_world>' pair to insert the world into; found "
            f"{counts.tolist()} per row. Build batches with theworld.data.collator.TheWorldCollator, which places "
            f"it after the world image"
        )
    return pairs.int().argmax(dim=1)


def insert_world_tokens(
    input_ids: torch.Tensor,
    num_world_tokens: int,
    *,
    sow_id: int,
    eow_id: int,
    world_id: int,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Splice `num_world_tokens` world placeholders into each row after its `<start_of_world>`.

    Returns a dict with `input_ids` and whichever of `attention_mask` (1 on the inserted positions),
    `token_type_ids` (0: world tokens attend causally) and `labels` (`-100`: the world is never a
    target) were given, all `num_world_tokens` longer.
    """
    starts = world_marker_positions(input_ids, sow_id, eow_id)
    batch, length = input_ids.shape
    device = input_ids.device
    # Destination column of every original token: shifted right by the block if it comes after the
    # row's <start_of_world>.
    columns = torch.arange(length, device=device).expand(batch, length)
    destination = columns + num_world_tokens * (columns > starts[:, None])

    def splice(tensor: torch.Tensor, fill) -> torch.Tensor:
        out = tensor.new_full((batch, length + num_world_tokens), fill)
        out.scatter_(1, destination, tensor)
        return out

    result = {"input_ids": splice(input_ids, world_id)}
    if attention_mask is not None:
        result["attention_mask"] = splice(attention_mask, 1)
    if token_type_ids is not None:
        result["token_type_ids"] = splice(token_type_ids, 0)
    if labels is not None:
        result["labels"] = splice(labels, IGNORE_INDEX)
    return result
