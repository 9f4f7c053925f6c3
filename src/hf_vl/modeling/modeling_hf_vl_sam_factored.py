"""SAM's decoder on factored image states (Kirillov et al. 2023, "Segment Anything", https://arxiv.org/abs/2304.02643;
original: facebookresearch/segment-anything @dca509f ``segment_anything/modeling/transformer.py``,
``mask_decoder.py``). Not in the original: an inference shortcut of
:class:`.modeling_hf_vl_sam_decoder.HfVlSamMaskDecoder`, the same sums reassociated.

Each two-way layer ``l`` ends with ``states_{l+1} = LN_l(states_l + P_l X_l)``: P_l (h*w, heads * tokens) the
image->token attention weights and X_l (heads * tokens, hidden) the token values through ``out_proj`` (bias in head
0's rows, :func:`.modeling_hf_vl_sam_two_way._low_rank_attention`); states_0 = E, the image embedding plus the
no-mask embedding, the same for every prompt on that image. A LayerNorm is a row scaling of one fixed linear map,
``LN(Z) = r * (Z C G) + beta``, with r the row's reciprocal standard deviation, C = I - 11^T / hidden the centring
and G = diag(gamma). So any linear map of the states after ``d`` layers, ``y = states_d W^T + b``, unrolls (B_d =
W^T, B_l = C G_l B_{l+1}) into

    y = S_0 * (E B_0) + sum_l (S_l * P_l) (X_l B_l) + sum_{l < d-1} S_{l+1} (beta_l B_{l+1}) + beta_{d-1} W^T + b

with S_l = r_l * ... * r_{d-1} per row: a per-image product E B_0 (computed once per image and cached) plus, per
prompt, a (h*w, K) x (K, out) product, K = d * heads * tokens + d - 1 (113 for vit_b's two layers and one point),
instead of a (h*w, hidden) x (hidden, out) one. The cross-attentions after the first layer and the first upscaling
read the prompts' states only through such maps, so they never project or even add the h*w positions per prompt:
scores and mixtures contract the few query rows with the factors instead (:meth:`FactoredStates.scores`,
:meth:`FactoredStates.mix`). The r_l themselves come from the factors too (:func:`layer_rstd`: squared row norms as
quadratic forms of the factors), so no prompt's (h*w, hidden) states are ever formed (fp32 and wider:
:data:`STATISTICS_FROM_FACTORS`).
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable

import torch
from torch import nn

# One two-way layer's image->token update: probs (rows, h*w, k) (any strides), mixed (rows, k, hidden), rstd (rows,
# h*w, 1): the reciprocal standard deviations of its LayerNorm's rows; values (rows, heads, tokens, head_dim) and
# out_proj (an nn.Linear), which make ``mixed`` (:func:`mixed_values`), when known: :func:`layer_rstd` needs them
ImageFactors = namedtuple("ImageFactors", ["probs", "mixed", "rstd", "values", "out_proj"], defaults=(None, None))

# the factored path is taken while layers * heads * tokens (the factors' width) is below FACTOR_BELOW * hidden (vit_b,
# one point: 2 * 8 * 7 = 112 < 256): a wider K costs more than the projections it replaces
FACTOR_BELOW = 1.0
# ... and for calls of at least FACTOR_MIN_ROWS prompts. vit_b, 2 CPU threads, interleaved A/B (ms per prompt, median):
# 64 points (chunks of 2 fp32 / 4 bf16 prompts) fp32 19.61 -> 16.81, bf16 11.68 -> 10.78; one point fp32 20.56 ->
# 20.96, bf16 13.51 -> 14.83: one prompt's products are too small for the factored ones to beat oneDNN's folded ones
FACTOR_MIN_ROWS = 2


# dtypes whose LayerNorm statistics come from the factors (layer_rstd) rather than from the states formed. Automatic
# masks, vit_b, 32x32 grid, in-process paired runs against forming them (2 decode workers of 1 thread): fp32 1.09x
# (23.8 against 25.0 s), bf16 0.94x (16.1 against 15.2 s): in bf16 forming (4096 x 256) states and a LayerNorm is
# cheap next to the Gram products (K ~ 112) and the passes over (K, 4096) terms that replace it
STATISTICS_FROM_FACTORS = (torch.float32, torch.float64)


def statistics_from_factors(dtype: torch.dtype) -> bool:
    """Whether the factored decoder takes its LayerNorm statistics from the factors for states of ``dtype``."""
    return dtype in STATISTICS_FROM_FACTORS


def memory_key(tensor: torch.Tensor) -> tuple:
    """Where a tensor's contents live and whether they changed: address, layout, version (None: inference tensor)."""
    version = None if tensor.is_inference() else tensor._version
    strides = tuple(stride if size > 1 else 0 for size, stride in zip(tensor.shape, tensor.stride()))  # as laid out
    return (tensor.data_ptr(), tuple(tensor.shape), strides, tensor.dtype, tensor.device, version)


def norm_chain(norms: list[nn.LayerNorm], weight: torch.Tensor) -> list[torch.Tensor]:
    """[B_0, ..., B_d] (each (hidden, out)) for ``weight`` (out, hidden) after the LayerNorms ``norms`` (layer 0
    first), computed in fp32 or wider and returned in ``weight``'s dtype."""
    wide = torch.promote_types(weight.dtype, torch.float32)
    maps = [weight.t().to(wide)]
    for norm in reversed(norms):
        scaled = norm.weight.to(wide)[:, None] * maps[0]  # G B
        maps.insert(0, scaled - scaled.mean(0, keepdim=True))  # C G B: each column centred
    return [matrix.to(weight.dtype) for matrix in maps]


def factorable(norms: list[nn.LayerNorm], heads: int, tokens: int, rows: int) -> bool:
    """Whether the unrolling applies and pays for ``rows`` prompts of ``tokens`` tokens: at least one layer, each
    LayerNorm affine over the last dimension alone, the factors narrower than the states (``FACTOR_BELOW``), enough
    prompts (``FACTOR_MIN_ROWS``)."""
    if rows < FACTOR_MIN_ROWS or not norms:
        return False
    if not all(isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1 for norm in norms):
        return False
    if any(norm.weight is None or norm.bias is None for norm in norms):
        return False
    return len(norms) * heads * tokens < FACTOR_BELOW * norms[0].normalized_shape[0]


def mixed_values(values: torch.Tensor, out_proj: nn.Linear) -> torch.Tensor:
    """The token values through ``out_proj``, per head: X (rows, heads * tokens, hidden) with rows h * tokens + t =
    V_h[t] W_h^T, W_h head h's columns of ``out_proj.weight``, and the bias in head 0's rows (image->token
    probabilities sum to one over each head's tokens, so it is added once per position). values (rows, heads,
    tokens, head_dim)."""
    rows, heads, _, head_dim = values.shape
    hidden = out_proj.weight.shape[0]
    # (rows, heads, tokens, d) @ (heads, d, hidden): out_proj.weight is (hidden, heads * d)
    mixed = torch.matmul(values, out_proj.weight.view(hidden, heads, head_dim).permute(1, 2, 0))
    if out_proj.bias is not None:
        mixed = torch.cat([mixed[:, :1] + out_proj.bias, mixed[:, 1:]], dim=1)
    return mixed.view(rows, -1, hidden)


class FactoredImage:
    """The image side of the factored states: E (groups, h*w, hidden) and the grid encoding (1, h*w, hidden) of the
    decoder's cached first-layer work (``projections``), the layers' LayerNorms, and the per-image products, kept in
    ``cache`` (a dict the decoder owns) while that work and the weights they come from are unchanged. ``final``:
    the last :class:`FactoredStates` the transformer built (read by the upscaling)."""

    def __init__(self, projections, norms: list[nn.LayerNorm], cache: dict):
        self.projections, self.norms, self.cache = projections, norms, cache
        self.keys, self.key_pe = projections.keys, projections.key_pe
        self.final: FactoredStates | None = None

    def _cached(self, name: tuple, params: tuple, compute: Callable[[], tuple]) -> tuple:
        """``compute()``, kept under ``name`` while the first-layer work and the sources (``params`` and the norms)
        are unchanged: the same memory, layout and version; the entry holds the sources, so their memory cannot be
        taken by other tensors while it lives."""
        sources = (*params, *(p for norm in self.norms for p in (norm.weight, norm.bias)))
        key = tuple(memory_key(t) for t in sources)
        entry = self.cache.get(name)
        if entry is None or entry[0] != key or entry[1] is not self.projections:
            # ordinary tensors even under inference_mode, so the entry stays usable after leaving it
            with torch.inference_mode(False), torch.no_grad():
                entry = self.cache[name] = (key, self.projections, compute(), sources)
        return entry[2]

    def chain(self, name: str, depth: int, params: tuple, weight: Callable[[], torch.Tensor], heads: int = 0,
              layout: str = "rows") -> tuple:  # fmt: skip
        """(maps B_0..B_depth, E B_0) for the linear map ``weight()`` (out, hidden) after ``depth`` layers; E B_0
        laid out as ``rows`` (groups, h*w, out), ``keys`` (groups, heads, out/heads, h*w) or ``values`` (groups,
        heads, h*w, out/heads). ``params``: what ``weight()`` is computed from (the cache key)."""

        def compute():
            maps = norm_chain(self.norms[:depth], weight())
            base = self.keys @ maps[0]
            if layout != "rows":  # (groups, h*w, out) -> (groups, heads, h*w, out/heads)
                base = base.view(*base.shape[:2], heads, -1).transpose(1, 2)
                base = (base.transpose(2, 3) if layout == "keys" else base).contiguous()
            return maps, base

        return self._cached((name, depth, layout), params, compute)

    def pe_product(self, name: str, linear: nn.Linear, heads: int) -> torch.Tensor:
        """The grid encoding through ``linear``'s weight, (heads, out/heads, h*w)."""

        def compute():
            product = self.key_pe[0] @ linear.weight.t()  # (h*w, out)
            return (product.view(product.shape[0], heads, -1).permute(1, 2, 0).contiguous(),)

        return self._cached((name, "pe"), (linear.weight,), compute)[0]


def _suffix_scales(factors: list[ImageFactors]) -> list[torch.Tensor]:
    """[S_0, ..., S_{d-1}], S_l = r_l * ... * r_{d-1}, each (rows, h*w, 1)."""
    scales = [factors[-1].rstd]
    for factor in reversed(factors[:-1]):
        scales.insert(0, factor.rstd * scales[0])
    return scales


class FactoredStates:
    """The prompts' image states after ``len(factors)`` two-way layers, (rows, h*w, hidden), in factored form;
    rows are groups x consecutive prompts, or belong to the images ``row_groups`` (:meth:`select`)."""

    def __init__(self, factors: list[ImageFactors], image: FactoredImage, row_groups=None, scales=None, left=None):
        self.factors, self.image, self.row_groups = list(factors), image, row_groups
        self.rows, self.length = factors[0].rstd.shape[:2]
        self.groups = image.keys.shape[0]
        self.scales = _suffix_scales(self.factors) if scales is None else scales
        self.left = self._left() if left is None else left

    def _left(self) -> torch.Tensor:
        """[S_0 P_0 | ... | S_{d-1} P_{d-1} | S_1 | ... | S_{d-1}], stored transposed: (rows, K, h*w)."""
        widths = [factor.mixed.shape[1] for factor in self.factors]
        left = self.image.keys.new_empty(self.rows, sum(widths) + len(widths) - 1, self.length)
        start = 0
        for factor, scale, width in zip(self.factors, self.scales, widths):
            # probabilities arrive as (rows, k, h*w) (a transposed view): no transposing copy
            torch.mul(factor.probs.transpose(1, 2), scale.transpose(1, 2), out=left[:, start : start + width])
            start += width
        for index, scale in enumerate(self.scales[1:]):
            left[:, start + index] = scale[..., 0]
        return left

    def select(self, rows: torch.Tensor) -> FactoredStates:
        """The states of the prompt ``rows`` only, for :meth:`linear` (:meth:`scores` and :meth:`mix` take an
        image's prompts together and need rows as groups x consecutive prompts)."""
        factors = [factor._replace(probs=factor.probs[rows], mixed=factor.mixed[rows], rstd=factor.rstd[rows],
                                   values=None if factor.values is None else factor.values[rows])
                   for factor in self.factors]  # fmt: skip
        return FactoredStates(factors, self.image, rows // (self.rows // self.groups),
                              [scale[rows] for scale in self.scales], self.left[rows])  # fmt: skip

    def _rights(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """The right factor for ``maps``: [X_l B_l ...; beta_l B_{l+1} ...], (rows, K, out)."""
        rights = [torch.matmul(factor.mixed, maps[index]) for index, factor in enumerate(self.factors)]
        norms = self.image.norms
        rights += [(norms[index].bias @ maps[index + 1]).expand(self.rows, 1, -1) for index in range(len(rights) - 1)]
        return torch.cat(rights, dim=1)

    def _constant(self, maps: list[torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        constant = self.image.norms[len(self.factors) - 1].bias @ maps[-1]  # beta_{d-1} W^T
        return constant if bias is None else constant + bias

    def _grouped(self, tensor: torch.Tensor) -> torch.Tensor:
        """(rows, ...) -> (groups, per, ...) (a view)."""
        return tensor.view(self.groups, -1, *tensor.shape[1:])

    def linear(self, name: str, params: tuple, weight: Callable[[], torch.Tensor], bias) -> torch.Tensor:
        """``states W^T + b`` (rows, h*w, out) for ``W = weight()``; ``params``: what it is computed from."""
        maps, base = self.image.chain(name, len(self.factors), params, weight)
        constant = self._constant(maps, bias)
        if self.row_groups is not None:
            out = torch.addcmul(constant, base[self.row_groups], self.scales[0])
        else:  # base (groups, h*w, out) broadcast over each image's prompts: (groups, per, h*w, out)
            out = torch.addcmul(constant, base[:, None], self._grouped(self.scales[0])).flatten(0, 1)
        return out.baddbmm_(self.left.transpose(1, 2), self._rights(maps))  # in place: out is fresh, no copy

    def _projection(self, linear: nn.Linear, heads: int, layout: str) -> tuple:
        """(maps, E B_0 per head in ``layout``) for an attention projection ``linear`` of these states."""
        return self.image.chain(f"{id(linear)}", len(self.factors), (linear.weight,), lambda: linear.weight, heads,
                                layout)  # fmt: skip

    def scores(self, linear: nn.Linear, heads: int, vectors: torch.Tensor, constant: bool) -> torch.Tensor:
        """Each row's ``vectors`` (rows, heads, m, d) dotted with ``linear(states + grid encoding)`` per head at every
        position: (rows, heads, m, h*w). ``constant``: include the terms that are the same at every position (a
        softmax over the positions drops them)."""
        rows, _, count, dim = vectors.shape
        maps, base = self._projection(linear, heads, "keys")
        # (rows, heads, m, d) x (rows, heads, d, K) -> (rows, heads * m, K), then x left (rows, K, h*w)
        rights = self._rights(maps).view(rows, -1, heads, dim).permute(0, 2, 3, 1)
        scores = torch.bmm(torch.matmul(vectors, rights).flatten(1, 2), self.left).view(rows, heads, count, -1)
        # the per-image terms, (groups, heads, per * m, d) x (groups, heads, d, h*w): an image's prompts at once
        grouped = self._grouped(vectors).transpose(1, 2).reshape(self.groups, heads, -1, dim)
        view = self._grouped(scores).transpose(1, 2)  # (groups, heads, per, m, h*w), a view of the rows' scores
        scale = self._grouped(self.scales[0]).view(self.groups, 1, -1, 1, self.length)
        view.addcmul_(torch.matmul(grouped, base).view(view.shape), scale)
        view += torch.matmul(grouped, self.image.pe_product(f"{id(linear)}", linear, heads)).view(view.shape)
        if constant:  # (rows, heads, m, d) x (heads, d, 1) -> (rows, heads, m, 1)
            scores += torch.matmul(vectors, self._constant(maps, linear.bias).view(heads, dim, 1))
        return scores

    def mix(self, linear: nn.Linear, heads: int, probs: torch.Tensor) -> torch.Tensor:
        """``probs`` (rows, heads, m, h*w), each row summing to one, times ``linear(states)`` per head: (rows, heads,
        m, d)."""
        rows, _, count, length = probs.shape
        maps, base = self._projection(linear, heads, "values")
        # S_0 (E B_0): (groups, heads, per * m, h*w) x (groups, heads, h*w, d), an image's prompts at once
        scaled = probs.new_empty(self.groups, heads, rows // self.groups, count, length)
        scale = self._grouped(self.scales[0]).view(self.groups, 1, -1, 1, length)
        torch.mul(self._grouped(probs).transpose(1, 2), scale, out=scaled)
        out = torch.matmul(scaled.flatten(2, 3), base).view(*scaled.shape[:4], -1)
        # (rows, heads * m, h*w) x left^T -> (rows, heads, m, K) x (rows, heads, K, d)
        rights = self._rights(maps)
        rights = rights.view(rows, rights.shape[1], heads, -1).transpose(1, 2)
        low = torch.bmm(probs.reshape(rows, heads * count, length), self.left.transpose(1, 2))
        low = torch.matmul(low.view(rows, heads, count, -1), rights)
        low += out.transpose(1, 2).reshape(low.shape)  # (groups, heads, per, m, d) -> (rows, heads, m, d)
        return low.add_(self._constant(maps, linear.bias).view(heads, 1, -1))


def _norm_products(image: FactoredImage, outputs: list[nn.Linear]) -> tuple:
    """The per-image side of :func:`layer_rstd` for layer ``l = len(outputs) - 1`` (``outputs``: the layers'
    ``out_proj``, layer 0 first). With B_0..B_l the maps of the centring C after l LayerNorms (:func:`norm_chain`,
    B_l = C) and A = E B_0: (maps, [A B_m^T W_m], [A B_m^T b_m], [A B_{m+1}^T beta_m], c = beta_{l-1} C), W_m / b_m
    layer m's ``out_proj`` weight / bias (what the prompts' rows of R dot with A), in E's dtype, and the squared row
    norms of A, A c^T and |c|^2 in fp32 or wider (summed with the per-prompt terms there)."""
    depth, keys = len(outputs) - 1, image.keys
    params = tuple(p for linear in outputs for p in (linear.weight, linear.bias) if p is not None)

    def compute():
        hidden = keys.shape[-1]
        wide = torch.promote_types(keys.dtype, torch.float32)
        centre = torch.eye(hidden, dtype=wide, device=keys.device) - 1.0 / hidden
        maps = [m.to(wide) for m in norm_chain(image.norms[:depth], centre)]
        base = keys.to(wide) @ maps[0]  # A (groups, h*w, hidden)
        weights = [base @ (maps[m].T @ linear.weight.to(wide)) for m, linear in enumerate(outputs)]
        biases = [None if linear.bias is None else base @ (maps[m].T @ linear.bias.to(wide))
                  for m, linear in enumerate(outputs)]  # fmt: skip
        betas = [base @ (maps[m + 1].T @ image.norms[m].bias.to(wide)) for m in range(depth - 1)]
        constant = image.norms[depth - 1].bias.to(wide) @ maps[depth] if depth else None
        wide_terms = ((base * base).sum(-1), None if constant is None else base @ constant,
                      None if constant is None else (constant * constant).sum())  # fmt: skip
        return (*(_cast(item, keys.dtype) for item in (maps, weights, biases, betas, constant)), *wide_terms)

    return image._cached(("norm", depth), params, compute)


def _cast(item, dtype: torch.dtype):
    """Tensors (in lists, nested) to ``dtype``; None as is."""
    if isinstance(item, (list, tuple)):
        return type(item)(_cast(x, dtype) for x in item)
    return None if item is None else item.to(dtype)


def _dot_rows(values: torch.Tensor, product: torch.Tensor, bias, out: torch.Tensor) -> None:
    """out (rows, heads * tokens, h*w) = :func:`mixed_values`'s rows (V_h W_h^T, + b in head 0's) dotted with the
    per-image A at every position, given ``product`` = A W (groups, h*w, heads * d) and ``bias`` = A b (groups,
    h*w) or None; rows are groups x consecutive prompts."""
    rows, heads, tokens, head_dim = values.shape
    groups, length = product.shape[:2]
    per = rows // groups
    # (groups, per, heads, tokens, d) -> (groups, heads, per * tokens, d) x (groups, heads, d, h*w)
    grouped = values.view(groups, per, heads, tokens, head_dim).transpose(1, 2).reshape(groups, heads, -1, head_dim)
    keys = product.view(groups, length, heads, head_dim).permute(0, 2, 3, 1)
    view = out.view(groups, per, heads, tokens, length).transpose(1, 2)  # (groups, heads, per, tokens, h*w)
    view.copy_(torch.matmul(grouped, keys).view(view.shape))
    if bias is not None:
        out.view(groups, per, heads * tokens, length)[:, :, :tokens] += bias[:, None, None]


def layer_rstd(image: FactoredImage, states: FactoredStates | None, pending: ImageFactors,
               norm: nn.LayerNorm) -> torch.Tensor:  # fmt: skip
    """The reciprocal standard deviations (rows, h*w, 1) of layer l's LayerNorm input z = s + P X, computed from the
    factors without forming z: s the states after the layers before (``states``, None for l = 0: s = E), P X the
    ``pending`` update (its ``values`` and ``out_proj`` given, ``rstd`` not yet).

    Centred, u = z C = S * A + L R + c per row (A = E B_0 per image, S = S_0, L = [left of ``states`` | P], R = [its
    right factor for C; X C], c = beta_{l-1} C; l = 0: S = 1, A = E C, L = P, R = X C, c = 0), so
    ||u||^2 = S^2 |A|^2 + 2 S A c^T + |c|^2 + <L, 2 R c^T + 2 S (R A^T) + (R R^T) L> summed over L's columns. R A^T
    never takes a (h*w, hidden) product per prompt: R's rows are token values through ``out_proj`` (per head
    V_h W_h^T) or fixed vectors, and A times those maps is per image (:func:`_norm_products`)."""
    factors = [] if states is None else states.factors
    outputs = [factor.out_proj for factor in factors] + [pending.out_proj]
    if any(linear is None for linear in outputs) or any(f.values is None for f in factors) or pending.values is None:
        raise ValueError("layer_rstd needs every layer's values and out_proj in its ImageFactors")
    maps, weights, biases, betas, constant, squares, cross, constant_square = _norm_products(image, outputs)
    probs = pending.probs.transpose(1, 2)  # (rows, k, h*w)
    length = probs.shape[-1]
    right = pending.mixed - pending.mixed.mean(-1, keepdim=True)  # X C
    left = probs if states is None else torch.cat([states.left, probs], dim=1)  # (rows, K, h*w)
    if states is not None:
        right = torch.cat([states._rights(maps), right], dim=1)  # (rows, K, hidden)
    # <L, (R R^T) L + 2 S (R A^T) + 2 R c^T>
    # R A^T (rows, K, h*w), block by block in R's order: the layers' X_m B_m, the beta rows, then X C
    dots, groups, start = torch.empty_like(left), image.keys.shape[0], 0
    for factor, weight, bias in zip(factors, weights, biases):
        _dot_rows(factor.values, weight, bias, dots[:, start : start + factor.mixed.shape[1]])
        start += factor.mixed.shape[1]
    for beta in betas:  # (groups, h*w) -> each prompt's row
        dots.view(groups, -1, *dots.shape[1:])[:, :, start] = beta[:, None]
        start += 1
    _dot_rows(pending.values, weights[-1], biases[-1], dots[:, start:])
    scale = None if states is None else states.scales[0].transpose(1, 2)  # S (rows, 1, h*w)
    mixed = torch.bmm(torch.bmm(right, right.transpose(1, 2)), left)
    mixed.add_(dots if scale is None else dots * scale, alpha=2)
    if constant is not None:
        mixed += 2 * (right @ constant)[..., None]
    wide = torch.promote_types(left.dtype, torch.float32)  # the sum of the terms in fp32 or wider
    total = torch.linalg.vecdot(left, mixed, dim=1).to(wide)  # (rows, h*w)
    grouped = total.view(groups, -1, length)  # the per-image terms, broadcast over each image's prompts
    if scale is None:
        grouped += squares[:, None]
    else:
        s = scale.to(wide).view(groups, -1, length)
        grouped += s * s * squares[:, None] + 2 * s * cross[:, None] + constant_square
    rstd = (total / norm.normalized_shape[0] + norm.eps).clamp_min(norm.eps).rsqrt()
    return rstd.to(pending.mixed.dtype)[..., None]


__all__ = ["FactoredImage", "FactoredStates", "ImageFactors", "factorable", "memory_key", "mixed_values",
           "norm_chain", "layer_rstd", "statistics_from_factors"]
