"""Placing a multi-stage method's official pruning layers in a model of another depth (used by the methods'
``default_schedule`` functions; a file starting with ``_`` registers nothing)."""

from __future__ import annotations

from typing import Sequence


def scale_layers(official: Sequence[int], official_depth: int, num_layers: int, min_layer: int = 0) -> list[int]:
    """The official layers of an ``official_depth``-layer model at the same relative depth of a ``num_layers``
    model: ``round(layer * num_layers / official_depth)`` (Python's round), each pushed up to stay >= ``min_layer``
    and above the previous one (shallow models). Raises ValueError if the last one falls outside the model."""
    layers: list[int] = []
    for layer in official:
        scaled = round(layer * num_layers / official_depth)
        layers.append(max(scaled, min_layer, layers[-1] + 1 if layers else min_layer))
    if layers[-1] >= num_layers:
        raise ValueError(f"{len(layers)} distinct pruning layers >= {min_layer} do not fit in a model with "
                         f"{num_layers} decoder layers")
    return layers
