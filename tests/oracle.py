"""Helpers shared by the model-patch oracle tests."""

from contextlib import contextmanager

import torch

from utils import PruneConfig

ATTN = ("eager", "sdpa")
STEPS = 5


@contextmanager
def patched(family_module, **env):
    """Apply a family's patches with this configuration (given as environment-variable strings)."""
    config = family_module.apply_patches(PruneConfig.from_env({k: str(v) for k, v in env.items()}))
    try:
        yield config
    finally:
        family_module.remove_patches()


def greedy(model, inputs, steps=STEPS):
    """Greedy ids (B, steps) and the logits of every step (steps, B, V)."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, -steps:], torch.stack(out.logits)


def forward_logits(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def capture_lm_inputs(model, inputs):
    """The unpatched language model's keyword inputs for this prompt (embeddings, positions, ...)."""
    captured = {}

    def hook(module, args, kwargs):
        captured.update(kwargs)

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        forward_logits(model, inputs)
    finally:
        handle.remove()
    return captured


def gather(x, index, dim=1):
    """x gathered along ``dim`` (batch dim ``dim - 1``) with a (B, L') index; -1 (padding slots) copies 0."""
    index = index.clamp(min=0)
    if x.shape[dim - 1] == 1 and index.shape[0] > 1:
        x = x.expand(*x.shape[:dim - 1], index.shape[0], *x.shape[dim:])
    shape = [1] * x.dim()
    shape[dim - 1], shape[dim] = index.shape
    return torch.gather(x, dim, index.view(shape).expand(*x.shape[:dim], index.shape[1], *x.shape[dim + 1:]))


def image_runs(ids, token_id):
    """Contiguous runs of ``token_id`` in a 1-D id tensor, as index tensors."""
    positions = torch.nonzero(ids == token_id).flatten()
    if positions.numel() == 0:
        return []
    return list(torch.tensor_split(positions, (torch.nonzero(positions.diff() != 1).flatten() + 1).tolist()))


def kept_mask(mask_2d, keep):
    """The 2-D padding mask of the kept sequence: padding slots (-1) are masked."""
    if mask_2d is None and bool((keep >= 0).all()):
        return None
    if mask_2d is None:
        mask_2d = torch.ones(keep.shape[0], int(keep.max()) + 1, dtype=torch.long)
    return gather(mask_2d, keep) * (keep >= 0)
