"""Template for a new pruning method: copy this file to ``methods/<name>.py`` and edit.

Files starting with ``_`` are not loaded, so this template registers nothing.

The contract
------------
* Register with ``@register_prune("<name>_pre_llm")`` (runs on the vision encoder's output, before the
  language model), ``@register_prune("<name>_intra_llm", default_layer=K)`` (runs on the hidden states
  entering decoder layer K during prefill) or ``@register_prune("<name>_vit", default_layer=B)`` (runs inside the
  vision encoder on the hidden states entering block B, per encoded image; ``ctx.sizes``, ``ctx.encoder_keys()``,
  ``ctx.encoder_cls_attention()``; merge with ``PruneResult(indices, features, sizes, proportional_attention)``;
  see ``methods/tome.py``). The suffix decides the stage.
* The function receives one :class:`methods.PruneContext` for ONE span (an image, a video, or a video frame
  where the model lays frames out separately) and returns either
    - a 1-D LongTensor of ``ctx.keep`` span-local indices (any order: the hook sorts them), or
    - ``PruneResult(indices, features)`` to merge: ``features[i]`` replaces the token at ``indices[i]`` and
      takes that token's original position.
* Useful fields: ``ctx.features`` [N, D], ``ctx.keep``, ``ctx.grid`` (t, h, w in LLM tokens), ``ctx.modality``,
  ``ctx.params`` (your hyper-parameters, parsed and validated), ``ctx.generator(seed)`` for randomness,
  ``ctx.hidden_states`` [L, D] (the whole sample: the LLM input embeddings pre-LLM, the hidden states at the
  layer intra-LLM), ``ctx.span_positions`` and ``ctx.text_positions`` (indices into it).
  ``ctx.text_after_span()`` (rows of the text that can attend to the span), ``ctx.input_embeddings()``.
  Intra-LLM only: ``ctx.layer``,
  ``ctx.attention_to_span(query_rows=None, layer=None)`` -> [H, r, N] probabilities (default: the last
  prompt token at layer K-1), ``ctx.attention_to_span_blocks(rows, layer)`` (many rows, block by block),
  ``ctx.key_states(layer)``, ``ctx.final_normed_hidden_states()``, ``ctx.span_input_embeddings()``.
  Signals are computed lazily, only when asked for, without an L x L attention matrix.
* A KV-cache method (``@register_prune("<name>_kv")``, configured by KV_METHOD / KV_BUDGET) receives a
  :class:`methods.KVContext` (one decoder layer of one sample's cache after the prefill: ``ctx.keys``,
  ``ctx.values``, ``ctx.budget``, ``ctx.window_attention(w)``, ``ctx.attention_column_sums()``) and returns the
  entries to keep, [K] or [H_kv, K]; see ``methods/snapkv.py`` and docs/kv_cache.md.
* A multi-stage intra-LLM method may register ``default_schedule=fn(num_layers, keep_ratio)`` returning
  ``[(layer, cumulative_ratio), ...]``: its own stages when it is named alone (see ``methods/pdrop.py``).
* Hyper-parameters are environment variables declared with ``HyperParam``; they are read once when the
  patches are applied and listed by ``python -m methods``. Never read ``os.environ`` in a method.
* Set ``exact_count=False`` only if the official algorithm decides the count itself; say how in the docstring.
"""

import torch

from methods import HyperParam, PruneContext, register_prune

NORM_POWER = HyperParam("MYMETHOD_POWER", 2.0, float, "p of the L_p norm used as importance",
                        check=lambda p: None if p > 0 else "must be > 0")


# @register_prune("mymethod_pre_llm", params=[NORM_POWER])   # uncomment in your copy
def mymethod_pre_llm(ctx: PruneContext) -> torch.Tensor:
    """One line shown by `python -m methods`: keep the tokens with the largest L_p norm."""
    scores = ctx.features.float().norm(p=ctx.params["MYMETHOD_POWER"], dim=-1)
    return scores.topk(ctx.keep).indices
