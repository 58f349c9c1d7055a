"""Training-only losses: the vision tower's dense heads, the text phase's question-to-patch and
caption loss, the LM's look loss and its relation readouts."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from vlmcompress.data.scenes import COLORS, SHAPES, SIZES
from vlmcompress.lvlm.labels import grid_xy


class DenseHeads(nn.Module):
    """Per-patch colour / shape / size / centre classifiers on the LLaVA feature layer, and
    (``position_weight`` > 0) the patch's grid row and column.

    Without the position heads nothing asks the tower to keep where a patch is: a linear probe
    of its object patches read the grid column right 10% of the time (chance 6%), and the LM
    answered spatial questions at chance and grounded nothing.
    """

    def __init__(self, dim: int, grid: int = 0, position_weight: float = 0.0, place_weight: float = 0.0,
                 xy_weight: float = 0.0, box_weight: float = 0.0) -> None:
        super().__init__()
        self.color = nn.Linear(dim, len(COLORS) + 1)
        self.shape = nn.Linear(dim, len(SHAPES) + 1)
        self.size = nn.Linear(dim, len(SIZES) + 1)
        self.centre = nn.Linear(dim, 2)
        self.position_weight = position_weight
        if position_weight > 0:
            self.row = nn.Linear(dim, grid)
            self.col = nn.Linear(dim, grid)
        self.place_weight = place_weight
        if place_weight > 0:      # drawing nothing the rest of the model draws: the same init with or without it
            with torch.random.fork_rng():
                self.place = nn.Linear(dim, 2)
        self.xy_weight = xy_weight
        if xy_weight > 0:
            with torch.random.fork_rng():
                self.xy = nn.Linear(dim, 2)
        self.box_weight = box_weight
        if box_weight > 0:
            with torch.random.fork_rng():
                self.box = nn.Linear(dim, 4)

    def loss(self, feats: Tensor, labels: Tensor, centres: Tensor | None = None, boxes: Tensor | None = None
             ) -> tuple[Tensor, dict[str, float]]:
        """``feats [B, N, D]``, ``labels [B, 4, G, G]`` -> loss and per-head patch accuracy.

        With ``place_weight`` > 0, also the MSE of each patch's object centre ``centres
        [B, 2, G, G]`` (:func:`~vlmcompress.lvlm.labels.patch_centres`), reported as its RMS error
        in pixels of a 128-pixel side on object patches (``place_px``); with ``box_weight`` > 0,
        the MSE of each patch's object box ``boxes [B, 4, G, G]``
        (:func:`~vlmcompress.lvlm.labels.patch_boxes`), its mean absolute error per coordinate
        in pixels on object patches as ``box_px``."""
        lab = labels.flatten(2).transpose(1, 2)               # [B, N, 4]
        obj = lab[..., 0] > 0
        total, acc = feats.new_zeros(()), {}
        for k, head in enumerate((self.color, self.shape, self.size)):
            logits = head(feats)
            mask = torch.ones_like(obj) if k == 0 else obj     # shape/size only on object patches
            total = total + F.cross_entropy(logits[mask], lab[..., k][mask])
            acc[("color", "shape", "size")[k]] = (logits.argmax(-1) == lab[..., k])[mask].float().mean().item()
        logits = self.centre(feats)
        total = total + F.cross_entropy(logits.reshape(-1, 2), lab[..., 3].reshape(-1),
                                        weight=feats.new_tensor([1.0, 8.0]))
        if self.position_weight > 0:
            g = labels.shape[-1]
            cell = torch.arange(g * g, device=feats.device)
            for name, target in (("row", cell // g), ("col", cell % g)):
                logits = getattr(self, name)(feats)                     # [B, N, G]
                tgt = target.expand(feats.shape[0], -1)
                total = total + self.position_weight * F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
                acc[name] = (logits.argmax(-1) == tgt)[obj].float().mean().item()
        if self.place_weight > 0:
            if centres is None:
                raise ValueError("DenseHeads.loss: place_weight > 0 needs the patches' object centres")
            err = (self.place(feats) - centres.flatten(2).transpose(1, 2)).pow(2).sum(-1)     # [B, N]
            total = total + self.place_weight * err.mean()
            acc["place_px"] = 64 * err[obj].mean().sqrt().item() if obj.any() else 0.0
        if self.xy_weight > 0:
            # The row / column classifiers leave the place in a code a linear map cannot read
            # off object patches (~15 px); a box wants it as coordinates.
            err = (self.xy(feats) - grid_xy(labels.shape[-1]).to(feats)).pow(2).sum(-1)          # [B, N]
            total = total + self.xy_weight * err.mean()
            acc["xy_px"] = 64 * err[obj].mean().sqrt().item() if obj.any() else 0.0
        if self.box_weight > 0:
            if boxes is None:
                raise ValueError("DenseHeads.loss: box_weight > 0 needs the patches' object boxes")
            # Every patch of an object learns the whole box, so one token answers for it.
            err = self.box(feats) - boxes.flatten(2).transpose(1, 2)                          # [B, N, 4]
            total = total + self.box_weight * err.pow(2).sum(-1).mean()
            acc["box_px"] = 64 * err[obj].abs().mean().item() if obj.any() else 0.0
        return total, acc


def text_losses(patches: Tensor, images: Tensor, questions: Tensor, captions: Tensor, rows: Tensor,
                targets: Tensor, scale: Tensor | float) -> tuple[Tensor, dict[str, float]]:
    """Phase A2's loss: question -> patch localisation plus image <-> caption contrast.

    ``patches [B, N, P]`` and ``images [B, P]`` unit embeddings of B images; ``questions [Q, P]``
    with ``rows [Q]`` (the image of each) and ``targets [Q, N]`` (distribution over its
    relevant patches); ``captions [B, P]`` one per image. Localisation is the cross-entropy of
    ``softmax(scale * cos)`` over the image's patches against the target; ``hit1`` is how often
    the most similar patch is a relevant one.
    """
    logits = scale * torch.einsum("qnp,qp->qn", patches[rows], questions)
    loc = -(targets * logits.log_softmax(-1)).sum(-1).mean()
    sim = scale * images @ captions.T
    tgt = torch.arange(images.shape[0])
    contrast = 0.5 * (F.cross_entropy(sim, tgt) + F.cross_entropy(sim.T, tgt))
    hit = targets.gather(1, logits.argmax(-1, keepdim=True)).gt(0).float().mean().item()
    return loc + contrast, {"loc": loc.item(), "contrast": contrast.item(), "hit1": hit}


def soft_number_ce(logits: Tensor, target: Tensor, ids: Tensor, values: Tensor, sigma: float) -> Tensor:
    """Per-position cross-entropy ``[M]`` of ``logits [M, V]`` against ``target [M]`` token ids,
    where a target that is one of the number tokens ``ids [K]`` (values ``values [K]``) is
    replaced by a Gaussian of width ``sigma`` over all of them, centred on its value.

    One-hot targets make "0.31" as wrong as "0.90" when "0.32" is true: the 101 coordinate
    tokens then share nothing, and a layer that knows the place to ~4 px reads out ~7 px."""
    logp = logits.log_softmax(-1)
    loss = -logp.gather(1, target[:, None]).squeeze(1)
    slot = torch.full((logits.shape[-1],), -1, dtype=torch.long, device=logits.device)
    slot[ids] = torch.arange(len(ids), device=logits.device)
    k = slot[target]
    num = k >= 0
    if num.any():
        soft = (-(values[None, :] - values[k[num]][:, None]).pow(2) / (2 * sigma ** 2)).softmax(-1)   # [M', K]
        loss = loss.clone()
        loss[num] = -(soft * logp[num][:, ids]).sum(-1)
    return loss


def attention_rows(attn: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor,
                   queries: Tensor, heads: int) -> Tensor:
    """The softmax attention of a Llama-style attention layer ``attn`` (``q_proj``, ``k_proj``,
    rotary embeddings, grouped key/value heads) at a few query rows only, from its inputs:
    ``hidden [B, T, D]``, the rotary ``cos`` / ``sin [B, T, hd]``, ``allowed [B, T, T]`` bool
    (query i may attend key j), ``queries [Q, 2]`` (batch row, position) -> ``[Q, heads, T]``
    for the layer's first ``heads`` heads.

    The same weights as the eager attention's, so a loss on a few rows does not need the whole
    ``[B, H, T, T]`` tensor: the forward keeps its fused kernel.
    """
    hd, groups = attn.head_dim, attn.num_key_value_groups
    b, i = queries[:, 0], queries[:, 1]
    q = F.linear(hidden[b, i], attn.q_proj.weight[:heads * hd],
                 None if attn.q_proj.bias is None else attn.q_proj.bias[:heads * hd])
    q = q.view(len(b), heads, 1, hd)
    kv = -(-heads // groups)                                           # key/value heads those heads read
    k = F.linear(hidden, attn.k_proj.weight[:kv * hd],
                 None if attn.k_proj.bias is None else attn.k_proj.bias[:kv * hd])
    k = k.view(*hidden.shape[:2], kv, hd).transpose(1, 2)              # [B, kv, T, hd]
    q, _ = apply_rotary_pos_emb(q, q, cos[b, i][:, None], sin[b, i][:, None])
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    k = k[b].repeat_interleave(groups, dim=1)[:, :heads]               # [Q, heads, T, hd]
    scores = (q @ k.transpose(-1, -2)).squeeze(2) * attn.scaling         # [Q, heads, T]
    scores = scores.masked_fill(~allowed[b, i][:, None], torch.finfo(scores.dtype).min)
    return scores.softmax(-1, dtype=torch.float32).to(hidden.dtype)


def look_loss(attn: Tensor, queries: Tensor, targets: Tensor) -> Tensor:
    """Negative log attention mass on the relevant tokens, averaged over queries.

    ``attn [Q, H, T]`` softmax attention rows of one layer at ``queries`` (or ``[B, H, T, T]``,
    the whole layer); ``queries [Q, 2]`` (batch row, position) of the supervised tokens;
    ``targets [Q, T]`` bool relevant keys. Queries without a relevant key (e.g. a scene with no
    object named) are skipped.
    """
    rows = (attn if attn.dim() == 3 else attn[queries[:, 0], :, queries[:, 1]]).mean(1)   # [Q, T]
    mass = (rows * targets).sum(-1)
    has = targets.any(-1)
    if not has.any():
        return attn.new_zeros(())
    return -(mass[has].clamp(min=1e-6).log()).mean()


class RelationHeads(nn.Module):
    """Phase C's auxiliary readouts for relation questions ("is the red circle left of the blue
    square?"), on the LM's hidden states; training only, not part of the saved LLaVA.

    ``where``: after ``layer`` LM layers, at each of the question's two shape words, that
    object's centre. ``compare``: one layer later, at the answer-predicting token, the first
    centre minus the second. Without them the LM answered relation questions at chance after
    2,000 steps, though a linear probe read "left of" from the visual tokens 81-96% of the time:
    nothing asked it to carry where an object is to the token that answers.

    Grounding turns use ``where`` at the referred object's shape word, and ``box``: at the token
    predicting each box coordinate, after the last layer, that coordinate. Cross-entropy alone
    over the 101 number tokens left the coordinates independent of the image.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.where = nn.Linear(dim, 2)
        self.compare = nn.Linear(dim, 2)
        self.box = nn.Linear(dim, 4)

    def losses(self, hidden: Sequence[Tensor], layer: int, words: Tensor, answers: Tensor, xy: Tensor
               ) -> tuple[Tensor, Tensor]:
        """MSE of both readouts. ``hidden``: the LM's hidden states (embeddings first), each
        ``[B, T, D]``; ``words [2Q, 2]`` (batch row, index) of the Q questions' shape words,
        first object then second for each; ``answers [Q, 2]`` their answer-predicting tokens;
        ``xy [Q, 2, 2]`` the two centres in [-1, 1]."""
        where = F.mse_loss(self.where(hidden[layer][words[:, 0], words[:, 1]]), xy.flatten(0, 1))
        diff = xy[:, 0] - xy[:, 1]
        compare = F.mse_loss(self.compare(hidden[layer + 1][answers[:, 0], answers[:, 1]]), diff)
        return where, compare

    def ground_losses(self, hidden: Sequence[Tensor], layer: int, words: Tensor, centres: Tensor,
                      slots: Tensor, coords: Tensor) -> Tensor:
        """Grounding turns: MSE of ``where`` (after ``layer`` layers) at the referred objects'
        shape words ``words [R, 2]`` against their centres ``centres [R, 2]``, plus MSE of
        ``box`` after the last layer at the coordinate-predicting tokens ``slots [S, 3]``
        (batch row, index, which coordinate 0..3) against ``coords [S]``; all in [-1, 1]."""
        where = F.mse_loss(self.where(hidden[layer][words[:, 0], words[:, 1]]), centres)
        pred = self.box(hidden[-1][slots[:, 0], slots[:, 1]]).gather(1, slots[:, 2:3]).squeeze(1)
        return where + F.mse_loss(pred, coords)
