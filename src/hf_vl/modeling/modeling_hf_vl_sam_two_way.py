"""SAM's two-way transformer (Kirillov et al. 2023, "Segment Anything", https://arxiv.org/abs/2304.02643,
appendix A). Original: facebookresearch/segment-anything @dca509f ``segment_anything/modeling/transformer.py``
(``TwoWayTransformer``, ``TwoWayAttentionBlock``). Split from :mod:`.modeling_hf_vl_sam_decoder`, whose docstring
lists the deviations from the original (those of this module included); its names are importable from there.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_hf_vl_sam import HfVlSamMaskDecoderConfig
from .hf_vl_attention import HfVlAttention, eager_attention_forward
from .hf_vl_mlp import HfVlMlp, can_fuse_linear, can_fuse_residual, fused_linear
from .modeling_hf_vl_sam_factored import (
    FactoredImage,
    FactoredStates,
    ImageFactors,
    layer_rstd,
    mixed_values,
    statistics_from_factors,
)

# The first two-way layer's image-side work: states ``keys`` (groups, h*w, hidden), grid encoding ``key_pe`` (1, h*w,
# hidden), keys_pe = keys + key_pe; token->image key, value, image->token query projections (groups, heads, h*w, d)
_ImageProjections = namedtuple("_ImageProjections", ["keys", "key_pe", "keys_pe", "key", "value", "query"])

# The folded cross-attentions (_folded_token_to_image, _image_to_token_logits) replace projections of the h*w image
# positions, (h*w, hidden) x (hidden, inner), by products with heads * queries rows: taken while those rows are fewer
# than FOLD_BELOW * inner (vit_b, one point: 8 heads * 7 tokens < 128), only in inference with autograd off.
FOLD_BELOW = 1.0


def _folds(attention: HfVlAttention, queries: int) -> bool:
    """Whether ``attention`` folds its image-side projection into ``queries`` token rows (per head)."""
    small = attention.num_heads * queries < FOLD_BELOW * attention.q_proj.out_features
    return small and not attention.training and not torch.is_grad_enabled()


def _products(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ right^T`` per group: left (groups or 1, m, k), right (groups, n, k) -> (groups, m, n). ``right`` may be
    a transposed view.

    On the CPU inference fast path each group is one oneDNN GEMM (:func:`.hf_vl_mlp.fused_linear`, ``right`` as its
    weight): on the decoder's skinny shapes (m = heads x tokens ~ 56, n or k = h*w = 4096) about 1.3-1.6x faster
    than ``bmm`` here, which also copies a transposed operand first. Elsewhere ``matmul``."""
    if not can_fuse_linear(left, right):
        return torch.matmul(left, right.transpose(1, 2))
    outputs = [fused_linear(left[index if left.shape[0] > 1 else 0], right[index], None)
               for index in range(right.shape[0])]  # fmt: skip
    return outputs[0][None] if len(outputs) == 1 else torch.stack(outputs)


def _softmax(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax computed in (at least) fp32, returned in ``logits``' dtype, as the eager attention does for bf16/fp16.

    PyTorch's CPU kernels already compute a bf16/fp16 softmax in fp32 and round once at the end, so on the CPU the
    logits go in as they are: no fp32 copy and conversion pass (the image->token softmax over a prompt's tokens, a
    strided dimension, took 2.8 ms per 4 bf16 prompts that way against 0.36 ms). Elsewhere ``dtype=float32``."""
    if logits.dtype in (torch.bfloat16, torch.float16) and logits.device.type != "cpu":
        return logits.softmax(dim, dtype=torch.float32).to(logits.dtype)
    return logits.softmax(dim)


def _fast_path(attention: HfVlAttention, *states: torch.Tensor) -> bool:
    """Whether ``attention``'s projections may take :func:`.hf_vl_mlp.fused_linear` for ``states``."""
    params = (*attention._qkv_params(), attention.out_proj.weight, attention.out_proj.bias)
    return can_fuse_linear(states[0], *params) and all(can_fuse_linear(x) for x in states[1:])


def _attend(
    attention: HfVlAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs
) -> torch.Tensor:
    """The configured attention kernel on projected (batch, heads, len, head_dim) -> (batch, q_len, inner)."""
    interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
        attention.config._attn_implementation, eager_attention_forward
    )
    output, _ = interface(attention, query, key, value, None, dropout=attention.dropout if attention.training else 0.0,
                          scaling=attention.scaling, is_causal=False, **kwargs)  # fmt: skip
    return output.reshape(*output.shape[:2], -1)  # (batch, q_len, heads, head_dim) -> (batch, q_len, inner)


def _output(attention: HfVlAttention, states: torch.Tensor, residual: torch.Tensor, fast: bool) -> torch.Tensor:
    """``out_proj(states) + residual``, the residual added in the GEMM epilogue on the fast path."""
    if not fast:
        return attention.out_proj(states) + residual
    weight, bias = attention.fast_weights("out", (attention.out_proj,), states.numel() // states.shape[-1])
    if can_fuse_residual(residual, states, attention.out_proj.out_features):
        return fused_linear(states, weight, bias, residual=residual)
    return fused_linear(states, weight, bias) + residual


def _token_to_image(
    attention: HfVlAttention, queries: torch.Tensor, query_pe: torch.Tensor, keys: torch.Tensor,
    keys_pe: torch.Tensor, projected: tuple[torch.Tensor, torch.Tensor] | None = None,
    factored: FactoredStates | None = None, **kwargs,
) -> torch.Tensor:
    """Token -> image cross-attention (+ residual) for rows = groups * per prompts against ``groups`` images.

    queries, query_pe (rows, tokens, hidden); keys, keys_pe (groups, h*w, hidden); ``projected``: the image's keys and
    values already projected (groups, heads, h*w, head_dim), or None. The prompts of one image attend to the same
    keys, so they are folded into the query length: the image's keys/values are projected once, not once per prompt
    (attention rows are independent, so this is the same arithmetic). ``factored``: the keys (rows of them, one per
    prompt) in factored form, which then stand for ``keys`` / ``keys_pe`` (:func:`_factored_token_to_image`)."""
    if factored is not None:
        return _factored_token_to_image(attention, queries, query_pe, factored)
    rows, tokens, hidden = queries.shape
    groups = keys.shape[0]
    # (rows, tokens, hidden) -> (groups, per * tokens, hidden)
    folded, with_pe = queries.reshape(groups, -1, hidden), (queries + query_pe).reshape(groups, -1, hidden)
    if projected is None and _folds(attention, with_pe.shape[1]):
        output = _folded_token_to_image(attention, with_pe, folded, keys, keys_pe)
    elif projected is None:
        output, _ = attention(with_pe, key_value_states=keys, key_states=keys_pe, residual=folded, **kwargs)
    else:
        fast = _fast_path(attention, with_pe)
        output = _attend(attention, _project(attention, "q", with_pe, fast), *projected, **kwargs)
        output = _output(attention, output, folded, fast)
    return output.reshape(rows, tokens, hidden)


def _folded_token_to_image(
    attention: HfVlAttention, with_pe: torch.Tensor, residual: torch.Tensor, keys: torch.Tensor, keys_pe: torch.Tensor
) -> torch.Tensor:
    """Token -> image attention (+ residual) with ``k_proj`` / ``v_proj`` folded into the few queries: per head h,
    q_h K_h^T = (q_h W_k_h)(X + pe)^T + q_h . b_k_h, whose last term is the same for every key (softmax drops it), and
    P_h V_h = (P_h X) W_v_h^T + b_v_h, each row of P_h summing to one. The image positions are never projected: two
    (heads * queries, hidden) x (hidden, h*w) products instead of two (h*w, hidden) x (hidden, inner) projections.

    with_pe, residual (groups, queries, hidden); keys, keys_pe (groups, h*w, hidden). Returns (groups, queries,
    hidden)."""
    groups, length, hidden = with_pe.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    fast = _fast_path(attention, with_pe)
    query = _project(attention, "q", with_pe, fast) * attention.scaling  # (groups, heads, queries, d)
    # q_h W_k_h: (groups, heads, queries, d) @ (heads, d, hidden) -> (groups, heads * queries, hidden)
    query = torch.matmul(query, attention.k_proj.weight.view(heads, head_dim, hidden)).view(groups, -1, hidden)
    logits = _products(query, keys_pe)  # (groups, heads * queries, h*w)
    probs = _softmax(logits, -1)
    # (P_h X) W_v_h^T: (groups, heads, queries, hidden) @ (heads, hidden, d) -> (groups, heads, queries, d)
    mixed = _products(probs, keys.transpose(1, 2)).view(groups, heads, length, hidden)
    output = torch.matmul(mixed, attention.v_proj.weight.view(heads, head_dim, hidden).transpose(1, 2))
    if attention.v_proj.bias is not None:
        output = output + attention.v_proj.bias.view(heads, 1, head_dim)
    output = output.transpose(1, 2).reshape(groups, length, heads * head_dim)  # (groups, queries, inner)
    return _output(attention, output, residual, fast)


def _factored_token_to_image(
    attention: HfVlAttention, queries: torch.Tensor, query_pe: torch.Tensor, states: FactoredStates
) -> torch.Tensor:
    """Token -> image attention (+ residual) against image states in factored form
    (:mod:`.modeling_hf_vl_sam_factored`): scores and values through the factors, the h*w positions never projected
    per prompt. queries, query_pe (rows, tokens, hidden) -> (rows, tokens, hidden)."""
    rows, tokens, _ = queries.shape
    with_pe = queries + query_pe
    fast = _fast_path(attention, with_pe)
    query = _project(attention, "q", with_pe, fast) * attention.scaling  # (rows, heads, tokens, d)
    probs = _softmax(states.scores(attention.k_proj, attention.num_heads, query, constant=False), -1)
    output = states.mix(attention.v_proj, attention.num_heads, probs)  # (rows, heads, tokens, d)
    return _output(attention, output.transpose(1, 2).reshape(rows, tokens, -1), queries, fast)


def _project(attention: HfVlAttention, name: str, states: torch.Tensor, fast: bool) -> torch.Tensor:
    """``attention.<name>_proj(states)`` (batch, len, width) -> (batch, heads, len, head_dim)."""
    linear = getattr(attention, f"{name}_proj")
    if fast:
        projected = fused_linear(states, *attention.fast_weights(name, (linear,), states.numel() // states.shape[-1]))
    else:
        projected = linear(states)
    # (batch, len, heads * head_dim) -> (batch, heads, len, head_dim)
    return projected.view(*states.shape[:2], -1, attention.head_dim).transpose(1, 2)


def _image_to_token_logits(
    attention: HfVlAttention, query: torch.Tensor | None, key: torch.Tensor, keys_pe: torch.Tensor
) -> torch.Tensor:
    """Scaled logits (groups, heads, per * tokens, h*w) of each image's positions against its prompts' token keys.

    key (rows, heads, tokens, head_dim), rows = groups * per prompts; ``query``: the image-side query projection
    (groups, heads, h*w, head_dim), or None: ``q_proj`` folded into the keys, (X + pe) (W_q_h^T K_h^T) + b_q_h K_h^T
    per head, a (hidden, tokens) matrix from the few keys instead of the (h*w, hidden) x (hidden, inner) projection."""
    rows, heads, tokens, head_dim = key.shape
    groups, hidden = keys_pe.shape[0], keys_pe.shape[-1]
    # (rows, heads, tokens, d) -> (groups, heads, per * tokens, d): an image's positions against all its prompts
    key = (key * attention.scaling).view(groups, -1, heads, tokens, head_dim).transpose(1, 2)
    key = key.reshape(groups, heads, -1, head_dim)
    if query is not None:  # logits token-major: the softmax over a prompt's tokens runs along h*w
        return torch.matmul(key, query.transpose(-1, -2))
    # K_h W_q_h: (groups, heads, per * tokens, d) @ (heads, d, hidden) -> (groups, heads * per * tokens, hidden)
    folded = torch.matmul(key, attention.q_proj.weight.view(heads, head_dim, hidden)).view(groups, -1, hidden)
    logits = _products(folded, keys_pe)  # (groups, heads * per * tokens, h*w)
    if attention.q_proj.bias is not None:  # K_h b_q_h: one logit offset per token key, the same at every position
        logits += torch.matmul(key, attention.q_proj.bias.view(heads, head_dim, 1)).view(groups, -1, 1)
    return logits.view(groups, heads, key.shape[2], -1)


def _low_rank_attention(
    attention: HfVlAttention, logits: torch.Tensor, value: torch.Tensor, residual: torch.Tensor | None,
    factors: list | None = None, form: bool = True, in_place: bool = False,
) -> torch.Tensor | None:
    """Image -> token attention, ``out_proj`` and residual, through the value rows: each image position's output is,
    per head h, a convex combination of the prompt's few token values, so ``out_proj(concat_h(A_h V_h)) = sum_h A_h
    (V_h W_h^T) + b`` with W_h head h's columns of ``out_proj.weight``: one (h*w, heads * tokens) x (heads * tokens,
    hidden) product instead of the (h*w, inner) x (inner, hidden) projection; the same sums, reassociated.

    logits (groups, heads, per * tokens, h*w) (:func:`_image_to_token_logits`); value (rows, heads, tokens,
    head_dim), rows = groups * per prompts; residual (groups, h*w, hidden). Returns (rows, h*w, hidden). With
    ``factors`` (:mod:`.modeling_hf_vl_sam_factored`) also appends the update (probabilities (rows, h*w, heads *
    tokens), token values through ``out_proj`` (rows, heads * tokens, hidden), ``value`` and ``out_proj``; no
    ``rstd`` yet), and unless ``form`` returns None: the states are not formed, ``residual`` is not read.
    ``in_place``: ``residual`` is the caller's own fresh (rows, h*w, hidden) tensor, which the states may overwrite."""
    rows, heads, tokens, head_dim = value.shape
    groups, length = logits.shape[0], logits.shape[-1]
    per = rows // groups
    probs = _softmax(logits.view(groups, heads, per, tokens, length), -2)
    # (groups, heads, per, tokens, h*w) -> (rows, heads * tokens, h*w) (a view for one prompt per group, else a copy
    # of whole h*w rows) -> (rows, h*w, heads * tokens), transposed: the GEMM reads it as is
    probs = probs.transpose(1, 2).reshape(rows, heads * tokens, length).transpose(1, 2)
    mixed = mixed_values(value, attention.out_proj)  # V_h W_h^T per head, the bias in head 0's rows
    if factors is not None:
        factors.append(ImageFactors(probs, mixed, None, value, attention.out_proj))
        if not form:
            return None
    hidden = mixed.shape[-1]
    if in_place and residual.shape[0] == rows:  # one 4096 x 256 copy per prompt less
        return residual.baddbmm_(probs, mixed)
    if groups in (1, rows):
        return torch.baddbmm(residual, probs, mixed)
    # (rows, h*w, hidden) + (groups, 1, h*w, hidden) broadcast over each image's prompts
    return (torch.bmm(probs, mixed).view(groups, per, length, hidden) + residual[:, None]).view(rows, length, hidden)


def _image_to_token(
    attention: HfVlAttention, keys: torch.Tensor, keys_pe: torch.Tensor, queries: torch.Tensor,
    queries_pe: torch.Tensor, query: torch.Tensor | None = None, factors: list | None = None,
    factored: FactoredStates | None = None, form: bool = True, **kwargs,
) -> torch.Tensor | None:
    """Image -> token cross-attention (+ residual) of ``groups`` images' states against rows = groups * per prompts.

    keys, keys_pe (groups, h*w, hidden); queries, queries_pe (rows, tokens, hidden); ``query``: the image-side query
    projection (groups, heads, h*w, head_dim) when already computed. Returns (rows, h*w, hidden). The image-side
    query projection is computed once per image and shared by its prompts; outside training the output projection
    runs through the token values (:func:`_low_rank_attention`), and in inference with few tokens the query
    projection is folded into the token keys instead (:func:`_image_to_token_logits`). ``factors``: see
    :func:`_low_rank_attention` (inference only), as is ``form``; ``factored``: the keys (rows of them) in factored
    form, which the logits then read instead of ``keys_pe`` (inference only)."""
    fast = _fast_path(attention, queries_pe if factored is not None else keys if keys_pe is None else keys_pe,
                      queries, queries_pe)  # fmt: skip
    if factored is not None:
        key = _project(attention, "k", queries_pe, fast) * attention.scaling
        logits = factored.scores(attention.q_proj, attention.num_heads, key, constant=True)
        # keys: the previous layer's formed states (a fresh LayerNorm output), or None when they are not formed
        return _low_rank_attention(attention, logits, _project(attention, "v", queries, fast), keys, factors, form,
                                   in_place=True)  # fmt: skip
    rows, groups = queries.shape[0], keys.shape[0]
    per, length, hidden = rows // groups, keys.shape[1], keys.shape[2]
    if query is None and not _folds(attention, per * queries.shape[1]):
        query = _project(attention, "q", keys_pe, fast)  # (groups, heads, h*w, head_dim)
    key, value = _project(attention, "k", queries_pe, fast), _project(attention, "v", queries, fast)
    if not attention.training:  # query None: folded (_image_to_token_logits)
        logits = _image_to_token_logits(attention, query, key, keys_pe)
        return _low_rank_attention(attention, logits, value, keys, factors, form)
    # (groups, heads, h*w, d) -> (groups, per, heads, h*w, d) -> (rows, heads, h*w, d): one copy, no GEMM per prompt
    query = query[:, None].expand(groups, per, *query.shape[1:]).reshape(rows, *query.shape[1:])
    output = attention.out_proj(_attend(attention, query, key, value, **kwargs))  # (rows, h*w, hidden)
    # (rows, h*w, hidden) + (groups, 1, h*w, hidden) broadcast over each image's prompts
    return (output.view(groups, per, length, hidden) + keys[:, None]).view(rows, length, hidden)


class HfVlSamTwoWayLayer(nn.Module):
    """Token self-attention, token->image cross-attention, token MLP, image->token cross-attention (post-norm).

    Positional encodings are added to queries and keys of every attention (never to values); the first layer's
    self-attention takes the bare tokens, without residual (``skip_first_layer_pe``), as in the original."""

    def __init__(self, config: HfVlSamMaskDecoderConfig, skip_first_layer_pe: bool):
        super().__init__()
        hidden, heads, eps = config.hidden_size, config.num_attention_heads, config.layer_norm_eps
        inner = hidden // config.attention_downsample_rate
        self.skip_first_layer_pe = skip_first_layer_pe
        self.self_attn = HfVlAttention(config, hidden, heads)
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.cross_attn_token_to_image = HfVlAttention(config, hidden, heads, inner_dim=inner)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = HfVlMlp(hidden, config.mlp_dim, config.hidden_act)
        self.layer_norm3 = nn.LayerNorm(hidden, eps=eps)
        self.cross_attn_image_to_token = HfVlAttention(config, hidden, heads, inner_dim=inner)
        self.layer_norm4 = nn.LayerNorm(hidden, eps=eps)

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor,
        image: _ImageProjections | None = None, factors: list | None = None, factored: FactoredStates | None = None,
        form: bool = True, **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """queries, query_pe (rows, tokens, hidden); keys (groups, h*w, hidden) with ``groups`` dividing ``rows``
        (consecutive rows are prompts of one image state); key_pe broadcastable to keys; ``image``: the image-side
        projections of these keys (:meth:`project_image`), or None. Returns queries and the image states, (rows,
        h*w, hidden). ``factors`` (inference only): this layer's image-state update is appended to it
        (:class:`.modeling_hf_vl_sam_factored.ImageFactors`); with ``form`` the states are formed and its ``rstd``
        set from their LayerNorm, else it is left None and None is returned for the states; ``factored`` (inference
        only): the states in factored form, which the cross-attentions then read (``keys`` is then only the
        residual of formed states, and may be None when they are not formed)."""
        if self.skip_first_layer_pe:
            queries, _ = self.self_attn(queries, **kwargs)
        else:
            with_pe = queries + query_pe
            queries, _ = self.self_attn(
                with_pe, key_value_states=queries, key_states=with_pe, residual=queries, **kwargs
            )
        queries = self.layer_norm1(queries)
        keys_pe = image.keys_pe if image is not None else None if factored is not None else keys + key_pe
        projected = None if image is None else (image.key, image.value)
        queries = self.layer_norm2(_token_to_image(self.cross_attn_token_to_image, queries, query_pe, keys, keys_pe,
                                                   projected, factored, **kwargs))  # fmt: skip
        queries = self.layer_norm3(self.mlp(queries, residual=queries))
        keys = _image_to_token(self.cross_attn_image_to_token, keys, keys_pe, queries, queries + query_pe,
                               None if image is None else image.query, factors, factored, form,
                               **kwargs)  # fmt: skip
        if factors is None:
            return queries, self.layer_norm4(keys)
        if keys is None:  # not formed: the transformer completes the update's factors (layer_rstd)
            return queries, None
        norm = self.layer_norm4
        keys, _, rstd = torch.native_layer_norm(keys, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        factors[-1] = factors[-1]._replace(rstd=rstd)
        return queries, keys

    def project_image(self, keys: torch.Tensor, key_pe: torch.Tensor) -> _ImageProjections:
        """The image-side projections of :meth:`forward` for keys (groups, h*w, hidden), key_pe (1, h*w, hidden)."""
        keys_pe = keys + key_pe
        to_image, to_token = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        fast = _fast_path(to_image, keys_pe, keys) and _fast_path(to_token, keys_pe)
        return _ImageProjections(
            keys, key_pe, keys_pe, _project(to_image, "k", keys_pe, fast), _project(to_image, "v", keys, fast),
            _project(to_token, "q", keys_pe, fast),
        )  # fmt: skip


class HfVlSamTwoWayTransformer(nn.Module):
    """``num_hidden_layers`` two-way layers, a final token->image attention and LayerNorm."""

    def __init__(self, config: HfVlSamMaskDecoderConfig):
        super().__init__()
        hidden = config.hidden_size
        self.layers = nn.ModuleList(
            HfVlSamTwoWayLayer(config, skip_first_layer_pe=index == 0) for index in range(config.num_hidden_layers)
        )
        self.final_attn_token_to_image = HfVlAttention(
            config, hidden, config.num_attention_heads, inner_dim=hidden // config.attention_downsample_rate
        )
        self.final_layer_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(
        self, image_embeddings: torch.Tensor | None, image_pe: torch.Tensor | None, tokens: torch.Tensor,
        image: _ImageProjections | None = None, output_tokens: list[int] | None = None,
        factored: FactoredImage | None = None, **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeddings (groups, hidden, h, w), ``groups`` dividing ``rows``: rows / groups consecutive prompts
        decode against each (groups = rows: one image state per prompt; fewer: shared, computed once);
        image_pe (1 or groups, hidden, h, w); tokens (rows, tokens, hidden). ``image``: the first layer's image-side
        work (:meth:`project_image`), which then stands for image_embeddings and image_pe (both ignored).
        ``output_tokens``: the token positions to return (default all); the final attention, whose query rows are
        independent, runs only for them (the decoder needs the IoU and mask tokens, never the prompt tokens).
        Returns tokens (rows, len(output_tokens) or tokens, hidden) and image states (rows, h*w, hidden).
        ``factored`` (inference only, with ``image``): the image side of the factored states
        (:mod:`.modeling_hf_vl_sam_factored`); the layers after the first and the final attention then read the
        prompts' states through their factors and ``factored.final`` receives the final states in that form. Where
        :func:`.modeling_hf_vl_sam_factored.statistics_from_factors` (fp32 and wider) the states are never formed:
        each layer's LayerNorm statistics come from the factors (``layer_rstd``) and None is returned for them."""
        if image is None:
            # (groups, hidden, h, w) -> (groups, h*w, hidden)
            keys, key_pe = image_embeddings.flatten(2).transpose(1, 2), image_pe.flatten(2).transpose(1, 2)
        else:
            keys, key_pe = image.keys, image.key_pe
        rows, groups = tokens.shape[0], keys.shape[0]
        if rows % groups != 0:
            raise ValueError(f"image_embeddings has {groups} images, which does not divide the {rows} prompt rows")
        queries, factors = tokens, None if factored is None else []
        form = factored is None or not statistics_from_factors(keys.dtype)
        for index, layer in enumerate(self.layers):
            states = FactoredStates(factors, factored) if factors else None  # the layers so far, factored
            queries, keys = layer(queries, keys, tokens, key_pe, image if index == 0 else None, factors, states,
                                  form, **kwargs)  # fmt: skip
            if not form:  # the LayerNorm's statistics of the states, from the factors
                factors[-1] = factors[-1]._replace(rstd=layer_rstd(factored, states, factors[-1], layer.layer_norm4))
        if output_tokens is not None:  # (rows, tokens, hidden) -> (rows, len(output_tokens), hidden)
            queries, tokens = queries[:, output_tokens], tokens[:, output_tokens]
        if factored is not None:
            factored.final = FactoredStates(factors, factored)
            queries = _token_to_image(self.final_attn_token_to_image, queries, tokens, keys, None,
                                      factored=factored.final)  # fmt: skip
        else:
            queries = _token_to_image(self.final_attn_token_to_image, queries, tokens, keys, keys + key_pe, **kwargs)
        if keys is not None and keys.shape[0] != rows:  # no layers: the image states were never expanded per prompt
            keys = keys.repeat_interleave(rows // keys.shape[0], dim=0)
        return self.final_layer_norm(queries), keys

    def project_image(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor) -> _ImageProjections:
        """The first layer's image-side work (image_embeddings (groups, hidden, h, w), image_pe (1, hidden, h, w)),
        channels-last and contiguous."""
        # (groups, hidden, h, w) -> (groups, h*w, hidden)
        keys = image_embeddings.flatten(2).transpose(1, 2).contiguous()
        return self.layers[0].project_image(keys, image_pe.flatten(2).transpose(1, 2).contiguous())



__all__ = ["HfVlSamTwoWayLayer", "HfVlSamTwoWayTransformer"]
