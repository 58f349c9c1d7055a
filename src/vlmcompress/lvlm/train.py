"""Staged training of the embedded LLaVA-architecture model on procedural scenes.

Trained jointly from scratch with the loss on answers only, a small LLaVA stays at the
most-common-answer baseline: its language model never learns to look. A staged recipe
fixes that, each stage giving the next a signal it can use:

A. **CLIP** (vision + text towers): per-patch heads on the LLaVA feature layer (colour,
   shape, size, object centre), patch-to-phrase alignment in the joint space (each object
   patch matches the text embedding of ``"a small red circle"``), and the usual contrastive
   image-caption loss.
A2. **Text tower** (vision frozen): each training question's CLIP embedding is pulled onto the
   patches it asks about (``relevant_patches``: a softmax over the image's patches with the
   target spread over them), beside the caption contrastive loss. Phase A aligns patches with
   full phrases only ("a small red circle"); a question naming just a shape ("how many
   circles") then pointed nowhere, and text-guided token recovery had nothing to recover.
B. **Projector alignment**: each projected patch token is regressed onto the sum of the LM's
   word embeddings of its object's words (background onto ``"background"``), so the LM starts
   out reading visual tokens as if they were words.
C. **Language model** (+ projector; towers frozen): multi-turn sequences (several questions,
   sometimes a caption and a grounding turn, about one image), loss on answer tokens, plus
   :class:`~vlmcompress.lvlm.heads.RelationHeads`' readouts of where a relation question's
   two objects are.

Training data are fresh scenes from seed streams that never produce val/test scenes. Every
batch is a pure function of ``(seed, phase, step)``, so a resumed run sees the same batches.
Each phase has a digest of the params it depends on
(:func:`~vlmcompress.lvlm.phases.phase_digests`); a finished phase whose digest still matches
is reused, so a changed text-phase recipe retrains neither the projector nor the LM.
Written with ``accelerate`` so the same code runs under ``accelerate launch``.

This module holds the :class:`Trainer` loop and each phase's step; what a turn is about is in
:mod:`~vlmcompress.lvlm.targets`, the losses in :mod:`~vlmcompress.lvlm.heads`, the LM's
sequences and token curriculum in :mod:`~vlmcompress.lvlm.curriculum`, the scene pool in
:mod:`~vlmcompress.lvlm.pool` and phase bookkeeping in :mod:`~vlmcompress.lvlm.phases`.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn

from vlmcompress.data.config import ScenesParams
from vlmcompress.data.scenes import COLORS, QUESTION_TYPES, SceneObject, make_questions, question_type
from vlmcompress.io import atomic_path, write_json
from vlmcompress.lvlm.adapter import CLIP_MEAN, CLIP_STD, LVLM, Prompts
from vlmcompress.lvlm.build import ModelSpec, build_clip, build_llava, save_lvlm
from vlmcompress.lvlm.config import LvlmParams
from vlmcompress.lvlm.curriculum import (TrainSeq, background_budget, chance_errors, ground_amount, kept_tokens,
                                         place_basis, place_code, position_code, sample_turns, turn_mask, type_probs)
from vlmcompress.lvlm.heads import (DenseHeads, RelationHeads, attention_rows, look_loss, soft_number_ce,
                                   text_losses)
from vlmcompress.lvlm.labels import mirror_boxes, mirror_centres
from vlmcompress.lvlm.phases import PHASE_OWNS, PHASE_STREAM, PHASES, phase_digests, progress_line
from vlmcompress.lvlm.pool import Pool, build_pool, scene_vocab, to_pixels
from vlmcompress.lvlm.targets import (PHRASES, ground_target, modifier_before, named_patches, number_slots,
                                     phrase_index, relation_targets, relevant_patches, word_positions)
from vlmcompress.lvlm.tokenizer import build_tokenizers, number_tokens
from vlmcompress.machine import compute_setup, merge_setups


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


class Trainer:
    """Runs phases A, A2, B, C (:data:`~vlmcompress.lvlm.phases.PHASES`) with resumable
    checkpoints under ``work_dir``; saves HF folders."""

    def __init__(self, params: LvlmParams, scenes: ScenesParams, work_dir: str | Path, seed: int,
                 log: Callable[[str], None] = print) -> None:
        self.p, self.t, self.scenes, self.seed = params, params.train, scenes, seed
        self.work = Path(work_dir)
        self.log = log
        self.accel = Accelerator()
        if self.t.threads > 0:
            torch.set_num_threads(self.t.threads)
        a = params.arch
        self.spec = ModelSpec(**dataclasses.asdict(a))
        self.prompts = Prompts(**dataclasses.asdict(params.prompts))
        torch.manual_seed(seed)
        vocab = scene_vocab(scenes, self.prompts)
        self.tok, self.clip_tok = build_tokenizers(vocab)
        ids = {k: self.tok.convert_tokens_to_ids(k) for k in ("<pad>", "<s>", "</s>", "<image>")}
        self.clip = build_clip(self.spec, len(vocab), ids["<pad>"], ids["<s>"], ids["</s>"])
        self.llava = build_llava(self.spec, self.clip, len(vocab), ids["<image>"], ids["<pad>"], ids["<s>"], ids["</s>"])
        self.heads = DenseHeads(a.vision_hidden, a.image_size // a.patch_size, self.t.clip_position_weight,
                                self.t.clip_place_weight, self.t.clip_xy_weight, self.t.clip_box_weight)
        if self.t.relation_readouts and not 0 <= self.t.lm_where_layer < a.lm_layers:
            raise ValueError(f"lvlm.train.lm_where_layer={self.t.lm_where_layer}: must be in [0, {a.lm_layers - 1}] "
                             f"(lvlm.arch.lm_layers={a.lm_layers}; the compare readout sits one layer later)")
        with torch.random.fork_rng():    # built after the models, drawing nothing they draw
            self.relation = RelationHeads(a.lm_hidden)
        # The box coordinates' tokens ("0.00" ... "1.00"), for the grounding readout's slots.
        self.number_table = number_tokens(self.tok.get_vocab())           # ids, values
        self.number_ids = set(self.number_table[0].tolist())
        self.colour_ids = set(self.tok.convert_tokens_to_ids(list(COLORS))) - {self.tok.unk_token_id}   # phrase look
        self.digests = phase_digests(params, scenes, seed)
        # Phase C's state across steps: each question type's recent answer error (lm_type_focus),
        # from chance.
        self.type_chance = chance_errors(scenes.max_objects)
        self.lm_state: dict[str, Any] = {"type_error": list(self.type_chance)}
        self.curves: list[dict[str, Any]] = []
        self.phase_seconds: dict[str, float] = {}

    # -- bookkeeping ----------------------------------------------------------------------
    @property
    def _progress_path(self) -> Path:
        return self.work / "progress.json"

    def _progress(self) -> dict[str, Any]:
        if self._progress_path.is_file():
            return json.loads(self._progress_path.read_text())
        return {"done": [], "phase": None, "step": 0, "seconds": {}}

    @property
    def _curves_path(self) -> Path:
        return self.work / "curves.jsonl"

    def _log_row(self, row: dict[str, Any]) -> None:
        """Keep a curve row in memory and in the work dir, so a resumed run has the whole curve."""
        self.curves.append(row)
        with open(self._curves_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def _load_curves(self, phase: str | None, step: int) -> None:
        """Rows logged before this run: every row of finished phases, and of ``phase`` up to
        its checkpoint ``step`` (later rows are about to be recomputed)."""
        if not self._curves_path.is_file():
            return
        rows = [json.loads(line) for line in self._curves_path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r["phase"] != phase or r["step"] <= step]
        with atomic_path(self._curves_path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.curves = rows

    def _save_weights(self, name: str) -> None:
        state = {"clip": self.clip.state_dict(), "llava": self.llava.state_dict(), "heads": self.heads.state_dict(),
                 "relation": self.relation.state_dict()}
        with atomic_path(self.work / f"{name}.pt") as tmp:
            torch.save(state, tmp)

    def _load_weights(self, name: str, phase: str) -> None:
        """Restore from snapshot ``name`` the weights ``phase`` trains (:data:`~vlmcompress.lvlm.phases.PHASE_OWNS`)."""
        state = torch.load(self.work / f"{name}.pt", map_location="cpu", weights_only=True)
        groups = {"clip": self.clip, "llava": self.llava, "heads": self.heads, "relation": self.relation}
        for group, prefixes in PHASE_OWNS[phase]:
            part = {k: v for k, v in state.get(group, {}).items() if k.startswith(prefixes)}
            want = {k for k in groups[group].state_dict() if k.startswith(prefixes)}
            if set(part) != want:
                raise RuntimeError(f"{name}.pt: the {phase} weights of '{group}' do not match this model "
                                   f"({len(want - set(part))} missing, {len(set(part) - want)} unexpected)")
            groups[group].load_state_dict(part, strict=False)

    def _rng(self, phase: str, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, PHASE_STREAM[phase], step])

    # -- the loop shared by all phases ------------------------------------------------------
    def _run_phase(self, phase: str, steps: int, lr: float, params: list[nn.Parameter] | list[dict[str, Any]],
                   step_fn: Callable[[np.random.Generator, int], tuple[Tensor, dict[str, float]]],
                   modules: list[nn.Module], eval_fn: Callable[[], dict[str, float]] | None = None,
                   max_grad_norm: float | None = 1.0, state: dict[str, Any] | None = None) -> None:
        """Train one phase, or load it when done with the same digest; resumes from the last
        checkpoint. ``state``: JSON-able state ``step_fn`` keeps across steps, checkpointed
        with the weights so a resumed run continues it exactly."""
        prog = self._progress()
        digest = self.digests[phase]
        digests = prog.setdefault("digests", {})
        if phase in prog["done"] and digests.get(phase) == digest:
            self._load_weights(f"after_{phase}", phase)
            self.phase_seconds[phase] = prog["seconds"].get(phase, 0.0)
            self.log(f"[{phase}] already done, loaded")
            return
        if phase in prog["done"]:
            self.log(f"[{phase}] done with other params: training again")
            prog["done"].remove(phase)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        trained = [q for g in groups for q in g["params"]]      # type: ignore[index]
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(self.t.warmup_steps, steps))
        # One phase's optimizer in the accelerator: its saved state then holds this phase alone, so
        # a run resumed in a new process (earlier phases loaded, not prepared) reads it back.
        self.accel.free_memory()
        opt, sched = self.accel.prepare(opt, sched)
        state_dir = self.work / f"{phase}_state"
        start, spent = 0, 0.0
        if prog["phase"] == phase and prog.get("phase_digest") == digest and state_dir.is_dir():
            self._load_weights(f"{phase}_weights", phase)
            self.accel.load_state(str(state_dir))
            start, spent = prog["step"], prog["seconds"].get(phase, 0.0)
            if state is not None:
                state.update(prog.get("phase_state", {}))
            self.log(f"[{phase}] resuming at step {start}")
        ran_on = prog.setdefault("setups", {})
        here = compute_setup()
        if start == 0:
            ran_on[phase] = []
        if here not in ran_on.setdefault(phase, []):
            ran_on[phase].append(here)
        self._load_curves(phase, start)      # rows of an interrupted or stale run of this phase go
        for m in modules:
            m.train()
        t0 = time.perf_counter() - spent
        for step in range(start, steps):
            loss, logs = step_fn(self._rng(phase, step), step)
            opt.zero_grad(set_to_none=True)
            self.accel.backward(loss)
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trained, max_grad_norm)
            opt.step()
            sched.step()
            row = {"phase": phase, "step": step + 1, "seconds": round(time.perf_counter() - t0, 1),
                   "loss": round(loss.item(), 4), **{k: round(v, 4) for k, v in logs.items()}}
            done = step + 1 == steps
            if eval_fn is not None and ((step + 1) % self.t.eval_every == 0 or done):
                for m in modules:
                    m.eval()
                row.update(eval_fn())
                for m in modules:
                    m.train()
            if (step + 1) % self.t.eval_every == 0 or done or step == start:
                self._log_row(row)
                self.log(progress_line(phase, steps, row))
            if (step + 1) % self.t.checkpoint_every == 0 and not done:
                self._save_weights(f"{phase}_weights")
                self.accel.save_state(str(state_dir))
                prog.update(phase=phase, step=step + 1, phase_digest=digest)
                if state is not None:
                    prog["phase_state"] = dict(state)
                prog["seconds"][phase] = time.perf_counter() - t0
                write_json(self._progress_path, prog)
        for m in modules:
            m.eval()
        self.phase_seconds[phase] = time.perf_counter() - t0
        self._save_weights(f"after_{phase}")
        prog["done"].append(phase)
        digests[phase] = digest
        prog["seconds"][phase] = self.phase_seconds[phase]
        prog.update(phase=None, step=0, phase_digest=None)
        prog.pop("phase_state", None)
        write_json(self._progress_path, prog)

    def setups(self) -> dict[str, str]:
        """Who trained the model: CPU kernel path, threads and CPU model over every phase
        (:func:`~vlmcompress.machine.merge_setups`; a phase reused from an older run without
        this record contributes nothing)."""
        ran_on = self._progress().get("setups", {})
        return merge_setups([s for phase in PHASES for s in ran_on.get(phase, [])])

    # -- phase A: CLIP ----------------------------------------------------------------------
    def _clip_step(self, pool: Pool) -> Callable[[np.random.Generator, int], tuple[Tensor, dict[str, float]]]:
        vision, clip, t = self.clip.vision_model, self.clip, self.t
        layer = self.spec.vision_feature_layer
        phrase_enc = self.clip_tok(PHRASES, padding=True, return_tensors="pt")

        def step(rng: np.random.Generator, step_no: int) -> tuple[Tensor, dict[str, float]]:
            idx = torch.from_numpy(rng.choice(len(pool.captions), t.clip_batch, replace=False))
            pix = to_pixels(pool.images[idx])
            labels, centres, boxes = pool.labels[idx], pool.centres[idx], pool.boxes[idx]
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            # Horizontal flips: images and labels together (captions are left-right free but
            # for the first, so flipped samples draw one of the unordered ones).
            pix = torch.where(flip[:, None, None, None], pix.flip(-1), pix)
            labels = torch.where(flip[:, None, None, None], labels.flip(-1), labels)
            centres = torch.where(flip[:, None, None, None], mirror_centres(centres), centres)
            boxes = torch.where(flip[:, None, None, None], mirror_boxes(boxes), boxes)
            caps = [pool.captions[i][int(rng.integers(1 if f else 0, len(pool.captions[i])))]
                    for i, f in zip(idx.tolist(), flip.tolist())]
            out = vision((pix - LVLM_MEAN) / LVLM_STD, output_hidden_states=True, return_dict=True)
            dense, acc = self.heads.loss(out.hidden_states[layer][:, 1:], labels, centres, boxes)
            scale = clip.logit_scale.exp().clamp(max=100)
            # Patch <-> phrase alignment in the joint space.
            ph = F.normalize(clip.text_projection(clip.text_model(**phrase_enc).pooler_output), dim=-1)
            pe = F.normalize(clip.visual_projection(vision.post_layernorm(out.last_hidden_state[:, 1:])), dim=-1)
            target = phrase_index(labels).flatten(1)                       # [B, N]
            ce = F.cross_entropy((scale * pe @ ph.T).flatten(0, 1), target.flatten(), reduction="none")
            objm = (target > 0).flatten().float()
            align = (ce * objm).sum() / objm.sum().clamp(min=1) + 0.1 * (ce * (1 - objm)).mean()
            # Image <-> caption contrastive loss.
            enc = self.clip_tok(caps, padding=True, return_tensors="pt")
            te = F.normalize(clip.text_projection(clip.text_model(**enc).pooler_output), dim=-1)
            ie = F.normalize(clip.visual_projection(out.pooler_output), dim=-1)
            logits = scale * ie @ te.T
            tgt = torch.arange(len(idx))
            contrast = 0.5 * (F.cross_entropy(logits, tgt) + F.cross_entropy(logits.T, tgt))
            acc["i2t"] = (logits.argmax(1) == tgt).float().mean().item()
            return dense + align + contrast, acc

        return step

    # -- phase A2: text tower -------------------------------------------------------------
    def _text_step(self, pool: Pool) -> Callable[[np.random.Generator, int], tuple[Tensor, dict[str, float]]]:
        clip, vision, t = self.clip, self.clip.vision_model, self.t

        def step(rng: np.random.Generator, step_no: int) -> tuple[Tensor, dict[str, float]]:
            idx = rng.choice(len(pool.captions), t.text_batch, replace=False)
            with torch.no_grad():
                out = vision((to_pixels(pool.images[torch.from_numpy(idx)]) - LVLM_MEAN) / LVLM_STD, return_dict=True)
                pe = F.normalize(clip.visual_projection(vision.post_layernorm(out.last_hidden_state[:, 1:])), dim=-1)
                ie = F.normalize(clip.visual_projection(out.pooler_output), dim=-1)
            texts, rows, targets = [], [], []
            for j, i in enumerate(idx.tolist()):
                for q in make_questions(pool.objects[i], rng, t.text_questions):
                    rel = relevant_patches(q["question"], pool.labels[i])
                    if rel.any():
                        texts.append(q["question"])
                        rows.append(j)
                        targets.append(rel.float() / rel.sum())
            caps = [pool.captions[i][int(rng.integers(len(pool.captions[i])))] for i in idx.tolist()]
            enc = self.clip_tok(texts + caps, padding=True, return_tensors="pt")
            te = F.normalize(clip.text_projection(clip.text_model(**enc).pooler_output), dim=-1)
            scale = clip.logit_scale.exp().clamp(max=100).detach()
            return text_losses(pe, ie, te[:len(texts)], te[len(texts):], torch.tensor(rows, dtype=torch.long),
                               torch.stack(targets), scale)

        return step

    # -- phase B: projector alignment -----------------------------------------------------
    def _align_step(self, pool: Pool) -> Callable[[np.random.Generator, int], tuple[Tensor, dict[str, float]]]:
        emb = self.llava.get_input_embeddings()
        ids = self.tok.convert_tokens_to_ids
        # Word ids of each phrase's words ("background" alone for background patches).
        words = [[ids(w) for w in ph.split() if w != "a"] for ph in PHRASES]
        proj, vision, layer = self.llava.model.multi_modal_projector, self.llava.model.vision_tower, self.spec.vision_feature_layer
        # The position code's unit is a word embedding's typical norm (the LM's embeddings
        # are at their initialisation here), so place weighs like one more word.
        word_norm = emb.weight.detach().norm(dim=-1).mean().item()
        dim, scale = emb.weight.shape[1], self.t.align_position_scale * word_norm
        where = position_code(self.spec.image_size // self.spec.patch_size, dim, scale, self.seed)
        target_of = self.t.align_position_target
        basis = place_basis(dim, self.seed, 4 if target_of == "box" else 2)

        def step(rng: np.random.Generator, step_no: int) -> tuple[Tensor, dict[str, float]]:
            idx = torch.from_numpy(rng.choice(len(pool.captions), self.t.align_batch, replace=False))
            with torch.no_grad():
                out = vision((to_pixels(pool.images[idx]) - LVLM_MEAN) / LVLM_STD, output_hidden_states=True,
                             return_dict=True)
                table = torch.stack([emb.weight[w].sum(0) for w in words])  # [P, D]
                # The place: the patch's own (position_code), or its object's centre or box,
                # shared by every patch of the object (place_code of labels.patch_centres or
                # labels.patch_boxes).
                if target_of == "patch":
                    place = where
                else:
                    xy = (pool.centres if target_of == "object" else pool.boxes)[idx].flatten(2).transpose(1, 2)
                    place = place_code(xy, dim, scale, self.seed)
                target = table[phrase_index(pool.labels[idx]).flatten(1)] + place  # [B, N, D]
            pred = proj(out.hidden_states[layer][:, 1:])
            loss = (pred - target).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean()
            if scale == 0:
                return loss, {}
            # The place's share of the error, logged and optionally weighted: on object tokens
            # it is the least-fitted part of the target (the words carry most of its energy).
            off = ((pred - target) @ basis / scale).pow(2)                      # [B, N, 2 | 4], [-1, 1] units
            logs = {"place_px": 64 * off.mean().sqrt().item()}
            if self.t.align_place_weight > 0:
                loss = loss + self.t.align_place_weight * off.mean()
            return loss, logs

        return step

    # -- phase C: language model ------------------------------------------------------------
    def _sequence(self, vis: Tensor, turns: list[tuple[str, str, str]], vis_pos: Tensor,
                  n_vis: int, isolate: bool = False) -> TrainSeq:
        """One multi-turn training sequence: ``inputs_embeds [T, D]``, ``labels [T]`` and
        ``position_ids [T]``, and per turn (index of the token that predicts its first answer
        token, the turn's text). ``vis [K, D]`` are the kept visual tokens at grid positions
        ``vis_pos [K]`` out of ``n_vis``; positions are those of the full sequence, so a token
        keeps its position whether or not its neighbours were dropped.

        ``isolate``: every turn is a single-turn sample sharing the image prefix — the first
        turn's prompt, positions restarting right after the image — and (with
        :func:`~vlmcompress.lvlm.curriculum.turn_mask`) seeing no other turn: the shape of every
        question at test time."""
        emb = self.llava.get_input_embeddings()
        eos = self.tok.eos_token_id
        before, after = self.prompts.render(turns[0][0], turns[0][1])
        pre = self.tok(before).input_ids
        ids: list[int] = []
        labels: list[int] = []
        weights: list[float] = []
        queries: list[tuple[int, str]] = []
        turn_prompts: list[tuple[int, list[int]]] = []
        segs: list[int] = []
        text_pos: list[Tensor] = []
        start = len(pre) + vis.shape[0]
        for k, (task, text, answer) in enumerate(turns):
            if k == 0:
                prompt = after
            elif isolate:
                prompt = self.prompts.render(task, text)[1]
            else:
                prompt = self.prompts.render_followup(task, text)
            p_ids = self.tok(prompt, add_special_tokens=False).input_ids
            a_ids = self.tok(" " + answer, add_special_tokens=False).input_ids + [eos]
            queries.append((start + len(ids) + len(p_ids) - 1, text))
            turn_prompts.append((start + len(ids), p_ids))
            text_pos.append(torch.arange(len(p_ids) + len(a_ids)) + (0 if isolate else len(ids)))
            ids += p_ids + a_ids
            segs += [k + 1] * (len(p_ids) + len(a_ids))
            labels += [-100] * len(p_ids) + a_ids
            weights += [0.0] * len(p_ids) + [1.0 / len(a_ids)] * len(a_ids)
        seq = torch.cat([emb(torch.tensor(pre)), vis, emb(torch.tensor(ids))])
        lab = torch.tensor([-100] * (len(pre) + vis.shape[0]) + labels)
        wts = torch.tensor([0.0] * (len(pre) + vis.shape[0]) + weights)
        pos = torch.cat([torch.arange(len(pre)), len(pre) + vis_pos, len(pre) + n_vis + torch.cat(text_pos)])
        seg = torch.tensor([0] * (len(pre) + vis.shape[0]) + segs)
        return TrainSeq(seq, lab, wts, pos, seg, queries, turn_prompts, len(pre))

    def lm_loss(self, feats: Tensor, labels: Tensor, objects: Sequence[Sequence[SceneObject]],
                captions: Sequence[Sequence[str]], rng: np.random.Generator, step_no: int
                ) -> tuple[Tensor, dict[str, float]]:
        """LM loss on a batch: ``feats [B, N, C]`` vision features of the LLaVA feature layer,
        ``labels [B, 4, G, G]`` their scenes' dense labels; turns are drawn from ``rng``.

        Cross-entropy on answer tokens, plus (from ``lm_look_start``) three look losses, each on the
        attention of one LM layer (the mean of its first few heads, or of all):
        ``lm_look_*`` at the positions ``lm_look_on`` names, ``lm_hop_*`` at each grounding
        turn's referred shape word, on that object's patches (and, as ``lm_hop_on`` says, at the
        words of questions that name objects); and ``lm_phrase_*`` at each of those hop words
        that follows a colour word, on that colour word: the hop can only tell the red cube from
        the blue one if its word already carries the colour, and left to the hop's own gradient
        that composition formed on some seeds and not on others.
        """
        proj, t = self.llava.model.multi_modal_projector, self.t
        lm, head = self.llava.model.language_model, self.llava.lm_head
        looking = step_no >= t.lm_look_start * t.lm_steps
        look, hop = looking and t.lm_look_weight > 0, looking and t.lm_hop_weight > 0
        phrase = hop and t.lm_phrase_weight > 0
        rel = t.relation_readouts
        grounding = t.lm_ground_weight > 0 and step_no >= t.lm_ground_start * t.lm_steps
        vis = proj(feats)
        n_bg = background_budget(step_no, t.lm_steps, t.lm_bg_start, t.lm_bg_ramp, labels[0, 0].numel())
        keep = kept_tokens(labels, n_bg, rng)
        probs = (type_probs(self.lm_state["type_error"], self.type_chance, t.lm_type_focus)
                 if t.lm_type_focus > 0 else None)
        g_prob, g_turns = ground_amount(step_no / t.lm_steps, t.ground_prob, t.ground_turns, t.ground_schedule)
        turns = [sample_turns(objects[b], captions[b], rng, t.lm_turns, t.caption_prob, g_prob,
                              self.spec.image_size, probs, g_turns, t.ground_absent) for b in range(len(objects))]
        seqs = [self._sequence(vis[b, keep[b]], turns[b], keep[b], vis.shape[1], t.lm_isolate_turns)
                for b in range(len(objects))]
        T = max(s.embeds.shape[0] for s in seqs)
        embeds = vis.new_zeros(len(seqs), T, vis.shape[-1])
        target_ids = torch.full((len(seqs), T), -100, dtype=torch.long)
        weights = torch.zeros(len(seqs), T)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        pos = torch.zeros(len(seqs), T, dtype=torch.long)
        segments = torch.full((len(seqs), T), -1, dtype=torch.long)
        queries, targets, hop_queries, hop_targets, phrase_queries, phrase_targets = [], [], [], [], [], []
        words, answers, centres = [], [], []       # relation questions (RelationHeads)
        g_words, g_centres, g_slots, g_coords = [], [], [], []   # grounding turns
        for b, sq in enumerate(seqs):
            n = sq.embeds.shape[0]
            embeds[b, :n], target_ids[b, :n], mask[b, :n], pos[b, :n] = sq.embeds, sq.labels, 1, sq.positions
            weights[b, :n], segments[b, :n] = sq.weights, sq.segments
            vis_at = sq.vis_start + torch.arange(len(keep[b])) if look or hop else None   # each kept token's index
            for (qpos, text), (p0, p_ids) in zip(sq.queries, sq.prompts):
                # A grounding turn's targets, read once for the readouts and the looks.
                ground = (self.ground_targets(sq, text, p0, p_ids, objects[b])
                          if (grounding and rel) or (look and t.lm_look_on != "answers") or hop else None)
                at, key = self._look_queries(qpos, ground) if look else ([], None)
                if at:
                    tgt = torch.zeros(T, dtype=torch.bool)
                    tgt[vis_at[relevant_patches(text, labels[b])[keep[b]]] if key is None else key] = True
                    queries += [(b, q) for q in at]
                    targets += [tgt] * len(at)
                n_hops = len(hop_queries)
                if hop and ground is not None:
                    tgt = torch.zeros(T, dtype=torch.bool)
                    tgt[vis_at[relevant_patches(text, labels[b])[keep[b]]]] = True
                    hop_queries.append((b, ground[0]))
                    hop_targets.append(tgt)
                elif hop and t.lm_hop_on != "ground":
                    for word, tgt in self._named_hops(text, p0, p_ids, labels[b], keep[b], vis_at, T):
                        hop_queries.append((b, word))
                        hop_targets.append(tgt)
                for _, word in hop_queries[n_hops:] if phrase else []:
                    colour = modifier_before(word, p0, p_ids, self.colour_ids)
                    if colour is not None:
                        tgt = torch.zeros(T, dtype=torch.bool)
                        tgt[colour] = True
                        phrase_queries.append((b, word))
                        phrase_targets.append(tgt)
                if not rel:
                    continue
                found = relation_targets(text, objects[b], self.spec.image_size)
                at = found and word_positions(p_ids, *self.tok.convert_tokens_to_ids(list(found[0])))
                if at:
                    words += [(b, p0 + at[0]), (b, p0 + at[1])]
                    answers.append((b, qpos))
                    centres.append(found[1])
                if grounding and ground is not None:
                    g_words.append((b, ground[0]))
                    g_centres.append(ground[1])
                    g_slots += [(b, i, k) for i, k in ground[2]]
                    g_coords += list(ground[3])
        looks = [(t.lm_look_layer, t.lm_look_heads, t.lm_look_weight, queries, targets, "look"),
                 (t.lm_hop_layer, t.lm_hop_heads, t.lm_hop_weight, hop_queries, hop_targets, "hop"),
                 (t.lm_phrase_layer, t.lm_phrase_heads, t.lm_phrase_weight, phrase_queries, phrase_targets, "phrase")]
        looks = [lk for lk in looks if lk[3]]   # lm_look_on ground: a batch without grounding turns has none
        inputs: dict[int, tuple[Tensor, Tensor, Tensor]] = {}   # a looked-at layer's attention inputs
        hooks = [lm.layers[layer].self_attn.register_forward_pre_hook(
            lambda mod, args, kw, layer=layer: inputs.__setitem__(layer, (kw["hidden_states"], *kw["position_embeddings"])),
            with_kwargs=True) for layer in {lk[0] for lk in looks}]
        allowed = (turn_mask(segments) if t.lm_isolate_turns
                   else torch.ones(T, T, dtype=torch.bool).tril() & mask[:, None, None, :].bool())
        attn_mask: Tensor = mask
        if t.lm_isolate_turns:   # additive 4-D mask: transformers passes a 4-D mask through as given
            attn_mask = torch.zeros(allowed.shape, dtype=embeds.dtype).masked_fill(~allowed, torch.finfo(embeds.dtype).min)
        try:
            out = lm(inputs_embeds=embeds, attention_mask=attn_mask, position_ids=pos, return_dict=True,
                     output_hidden_states=rel)
            h = out.last_hidden_state
        finally:
            for hk in hooks:
                hk.remove()
        sel = target_ids[:, 1:] != -100                   # logits only where an answer token is next
        logits = head(h[:, :-1][sel])
        target = target_ids[:, 1:][sel]
        soft = t.lm_number_sigma > 0
        if t.lm_loss_per == "turn" or soft:
            per = (soft_number_ce(logits, target, *self.number_table, t.lm_number_sigma) if soft
                   else F.cross_entropy(logits, target, reduction="none"))
            w = weights[:, 1:][sel] if t.lm_loss_per == "turn" else torch.ones_like(per)
            loss = (per * w).sum() / w.sum()
        else:   # the fused mean: bit for bit what recorded runs computed
            loss = F.cross_entropy(logits, target)
        logs = {"tok_acc": (logits.argmax(-1) == target).float().mean().item()}
        if probs is not None:
            rows = torch.arange(len(seqs))[:, None].expand(-1, T - 1)[sel]
            first = (target_ids[:, :-1] == -100)[sel]                # each turn's first answer token
            self._track_type_error(logits[first], target[first], turns, rows[first], segments[:, 1:][sel][first])
            logs.update({f"p_{k}": float(p) for k, p in zip(QUESTION_TYPES, probs)})
        for layer, heads, weight, qs, tgts, name in looks:
            at = torch.tensor(qs)
            rows = attention_rows(lm.layers[layer].self_attn, *inputs[layer], allowed[:, 0], at,
                                  heads or lm.config.num_attention_heads)
            ll = look_loss(rows, at, torch.stack(tgts))
            loss = loss + weight * ll
            logs[name] = ll.item()
        if rel and answers:
            wl, cl = self.relation.losses(out.hidden_states, t.lm_where_layer, torch.tensor(words),
                                          torch.tensor(answers), torch.stack(centres))
            loss = loss + t.lm_where_weight * wl + t.lm_compare_weight * cl
            logs.update(where=wl.item(), compare=cl.item())
        if rel and g_slots:
            gl = self.relation.ground_losses(out.hidden_states, t.lm_where_layer, torch.tensor(g_words),
                                             torch.stack(g_centres), torch.tensor(g_slots), torch.stack(g_coords))
            loss = loss + t.lm_ground_weight * gl
            logs["ground"] = gl.item()
        return loss, logs

    def _track_type_error(self, logits: Tensor, target: Tensor, turns: Sequence[Sequence[tuple[str, str, str]]],
                          rows: Tensor, segments: Tensor) -> None:
        """Fold this batch's answer error of each question type into ``lm_state["type_error"]``
        (an exponential moving average), which :func:`type_probs` turns into how often each type
        is asked. ``logits [A, V]`` / ``target [A]`` at the batch's first answer tokens, ``rows
        [A]`` / ``segments [A]`` the sequence and turn (1-based) of each."""
        kinds = torch.full((len(turns), 1 + max(len(tr) for tr in turns)), -1, dtype=torch.long)
        for b, tr in enumerate(turns):
            for k, (task, text, _) in enumerate(tr):
                qtype = question_type(text) if task == "vqa" else None
                if qtype is not None:
                    kinds[b, k + 1] = QUESTION_TYPES.index(qtype)
        wrong = (logits.detach().argmax(-1) != target).float()
        kind = kinds[rows, segments]
        ema = self.lm_state["type_error"]
        for k in range(len(QUESTION_TYPES)):
            if (kind == k).any():
                ema[k] = _TYPE_EMA * ema[k] + (1 - _TYPE_EMA) * wrong[kind == k].mean().item()

    def _look_queries(self, qpos: int, ground: tuple[int, Tensor, list[tuple[int, int]], Tensor] | None
                      ) -> tuple[list[int], int | None]:
        """The positions of one turn that the look loss supervises (``lm_look_on``), and where
        they should look: None for the patches the turn is about, else one sequence index.
        ``qpos``: the token predicting the turn's first answer token; ``ground``: the turn's
        :meth:`ground_targets` (None: not a grounding turn).

        ``answers``: ``qpos``. ``ground``: on a grounding turn only (none on other turns), each
        token predicting a box coordinate. ``ground_word``: the same tokens, looking at the
        referred object's shape word — the second hop of object -> shape word -> coordinate."""
        if self.t.lm_look_on == "answers":
            return [qpos], None
        if ground is None:
            return [], None
        return [i for i, _ in ground[2]], (ground[0] if self.t.lm_look_on == "ground_word" else None)

    def _named_hops(self, text: str, p0: int, p_ids: list[int], labels: Tensor, keep: Tensor, vis_at: Tensor,
                    T: int) -> list[tuple[int, Tensor]]:
        """The hop look of a question (``lm_hop_on`` ``exists``: existence questions only;
        ``named``: every question): per object phrase it names, the index of the phrase's head
        word and where that word should look, ``[T]`` bool — the named objects' kept patches, or
        the sequence's first token when the scene has none, so the head that fetches a named
        object learns to fetch nothing rather than a near miss. ``labels [4, G, G]``; ``keep
        [K]`` the kept grid indices, at sequence indices ``vis_at [K]``."""
        named = named_patches(text, labels, "exists" if self.t.lm_hop_on == "exists" else None)
        ids = self.tok.convert_tokens_to_ids([w for w, _ in named])
        at = [i for i, tid in enumerate(p_ids) if tid in ids]
        if len(at) < len(named):    # a template that hides a word: no target rather than a wrong one
            return []
        out = []
        for (_, on), i in zip(named, at[len(at) - len(named):]):
            tgt = torch.zeros(T, dtype=torch.bool)
            kept = on[keep]
            tgt[vis_at[kept] if kept.any() else 0] = True
            out.append((p0 + i, tgt))
        return out

    def ground_targets(self, seq: TrainSeq, text: str, p0: int, p_ids: list[int], objs: Sequence[SceneObject]
                       ) -> tuple[int, Tensor, list[tuple[int, int]], Tensor] | None:
        """A grounding turn's readout targets in ``seq`` (its prompt starts at ``p0``, ids
        ``p_ids``): the index of the referred shape word, the object's centre ``[2]``, the
        (index, coordinate k) of each token predicting a box coordinate and the coordinates
        ``[len(slots)]``, all in [-1, 1]. None for any other turn."""
        found = ground_target(text, objs, self.spec.image_size)
        if found is None:
            return None
        shape_id = self.tok.convert_tokens_to_ids(found[0])
        word = p0 + len(p_ids) - 1 - p_ids[::-1].index(shape_id)    # the ref ends the prompt
        a0 = p0 + len(p_ids)                                         # the first answer token
        at = number_slots(seq.labels[a0:a0 + 16].tolist(), self.number_ids)
        slots = [(a0 + i - 1, k) for k, i in enumerate(at)]          # the token before each number
        return word, found[1], slots, found[2][:len(slots)]

    def _pool_features(self, pool: Pool, chunk: int = 100) -> Tensor:
        """The frozen tower's LLaVA feature layer for every pool scene -> ``[P, N, C]``.

        The tower is frozen in phase C and each scene is drawn about three times, so one pass
        over the pool replaces a tower forward in every step (about a quarter of a step's cost).
        """
        vision, layer = self.llava.model.vision_tower, self.spec.vision_feature_layer
        out = []
        with torch.no_grad():
            for i in range(0, len(pool.captions), chunk):
                h = vision((to_pixels(pool.images[i:i + chunk]) - LVLM_MEAN) / LVLM_STD, output_hidden_states=True,
                           return_dict=True).hidden_states[layer]
                out.append(h[:, 1:].clone())
        return torch.cat(out)

    def _lm_step(self, pool: Pool) -> Callable[[np.random.Generator, int], tuple[Tensor, dict[str, float]]]:
        feats: list[Tensor] = []     # filled on the first step, so a finished phase never pays for it

        def step(rng: np.random.Generator, step_no: int) -> tuple[Tensor, dict[str, float]]:
            if not feats:
                feats.append(self._pool_features(pool))
            idx = rng.choice(len(pool.captions), self.t.lm_batch, replace=False)
            sel = torch.from_numpy(idx)
            return self.lm_loss(feats[0][sel], pool.labels[sel], [pool.objects[i] for i in idx],
                                [pool.captions[i] for i in idx], rng, step_no)

        return step

    @property
    def projector(self) -> nn.Module:
        """The LLaVA's multimodal projector: phase B trains it alone, phase C at
        ``lm_projector_lr_scale`` × ``lm_lr``."""
        return self.llava.model.multi_modal_projector

    @property
    def lm_parameters(self) -> list[nn.Parameter]:
        """What phase C trains at ``lm_lr``: the LM, its head and (``relation_readouts``) the
        relation readouts."""
        params = list(self.llava.model.language_model.parameters()) + list(self.llava.lm_head.parameters())
        return params + list(self.relation.parameters()) if self.t.relation_readouts else params

    def lvlm(self) -> LVLM:
        """The model being trained, behind the adapter (shares the modules, no copy)."""
        self.clip.vision_model.load_state_dict(self.llava.model.vision_tower.state_dict())
        self.llava.model.vision_tower.eval()
        return LVLM(self.llava, self.tok, self.clip, self.clip_tok, prompts=self.prompts,
                    attn_layer=self.p.attn_layer).eval()

    # -- everything -------------------------------------------------------------------------
    def run(self, out_dir: str | Path, eval_fn: Callable[[LVLM], dict[str, float]] | None = None) -> dict[str, float]:
        """Train all phases (resuming if a previous run was interrupted) and save HF folders."""
        self.work.mkdir(parents=True, exist_ok=True)
        prog = self._progress()
        self._load_curves(prog["phase"], prog["step"])
        t0 = time.perf_counter()
        pool = build_pool(self.scenes, self.t.pool_scenes, self.spec.patch_size)
        self.phase_seconds["pool"] = time.perf_counter() - t0
        self.log(f"pool of {self.t.pool_scenes} scenes in {self.phase_seconds['pool']:.1f} s")
        c, v = self.clip, self.clip.vision_model
        self._run_phase("clip", self.t.clip_steps, self.t.clip_lr,
                        list(c.parameters()) + list(self.heads.parameters()), self._clip_step(pool), [c, self.heads],
                        # Several summed losses give large gradient norms: clipping at 1 slowed
                        # shape learning several-fold in probes, and the phase is stable without it.
                        max_grad_norm=None)
        self.llava.model.vision_tower.load_state_dict(v.state_dict())
        # The tower is frozen from here on, in eval mode: a reused phase A leaves the freshly
        # built model in train mode, and the stem's BatchNorm would then embed the text phase's
        # patches with batch statistics instead of the running ones used at inference.
        v.requires_grad_(False).eval()
        text = [c.text_model, c.text_projection]
        self._run_phase("text", self.t.text_steps, self.t.text_lr, [q for m in text for q in m.parameters()],
                        self._text_step(pool), text)
        # Frozen from here on, and in eval mode: BatchNorm in the stem must use its running
        # statistics, not the statistics of each training batch.
        self.llava.model.vision_tower.requires_grad_(False).eval()
        proj = self.projector
        self._run_phase("align", self.t.align_steps, self.t.align_lr, list(proj.parameters()),
                        self._align_step(pool), [proj])
        lm_params = self.lm_parameters
        # The projector at a fraction of lm_lr: trained at the full rate it washes the position
        # code out of the tokens (a linear probe of its output read the column 16% right, the
        # tower's 97%); frozen (0) it keeps phase B's map of words + position code.
        scale = self.t.lm_projector_lr_scale
        proj.requires_grad_(scale > 0)
        lm_groups = [{"params": lm_params}] + ([{"params": list(proj.parameters()), "lr": self.t.lm_lr * scale}]
                                               if scale > 0 else [])
        ev = (lambda: eval_fn(self.lvlm())) if eval_fn is not None else None
        self._run_phase("lm", self.t.lm_steps, self.t.lm_lr, lm_groups, self._lm_step(pool),
                        [proj, self.llava.model.language_model, self.llava.lm_head, self.relation], ev,
                        state=self.lm_state if self.t.lm_type_focus > 0 else None)
        save_lvlm(out_dir, self.llava, self.tok, self.clip, self.clip_tok)
        return {f"{k}_seconds": round(s, 1) for k, s in self.phase_seconds.items()}

    def write_curves(self, path: str | Path) -> None:
        keys: list[str] = []
        for row in self.curves:
            keys += [k for k in row if k not in keys]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(self.curves)


_TYPE_EMA = 0.9    # decay of each question type's answer-error average (lm_type_focus)
LVLM_MEAN = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
LVLM_STD = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
