"""Does the LVLM localise the referred object? Teacher-forced box coordinates on test refs.

    python scripts/grounding_probe.py MODEL_DIR [--refs 300]     # MODEL_DIR holds llava/ and clip/
    python scripts/grounding_probe.py MODEL_DIR --refs 600 --layers   # + where each layer holds the box

For each referring expression (the first ``--refs`` of the test split), the true answer
``[x1, y1, x2, y2]`` is fed and, at each coordinate, the most likely of the number tokens
(``0.00`` ... ``1.00``) is read. Prints the mean absolute error of each coordinate (fraction of
the image side; a guess that ignores the image scores about 1/3), how often the unrestricted
argmax is a number at all, and the accuracy at IoU >= 0.5 of the box of the four restricted
argmaxes (x2, y2 are read knowing the true x1, y1, so this is an upper bound on what the
model's own boxes can score), overall and for small and large boxes (mean side under / over
``SMALL_SIDE`` of the image side: a scene's small objects are ~0.10 of it, its large ~0.23).

``--attention`` prints, for every LM layer and head, the mean attention mass of the tokens
predicting a coordinate on the referred object's patches (those whose centre lies in its box)
and on the image as a whole, and that of the referring expression's last word (its head noun)
on the object: whether the coordinate tokens look at the object, directly or through the
word that names it, and in which layer.

``--layers`` also fits, for every LM layer, a linear probe (ridge, two folds) of each
coordinate from that layer's hidden state at the token predicting it, and prints its mean
absolute error: whether a layer *holds* the coordinate more precisely than the number tokens
*say* it (a readout problem) or not (the model does not know where the object is).
Results: ``docs/experiments/2026-12-04-lvlm-grounding-readout-late-start.md`` and
``docs/experiments/2026-12-04-lvlm-where-position-is-lost.md`` (``--layers``) and
``docs/experiments/2026-12-04-lvlm-grounding-look-and-shorter-lm.md`` (by box size, ``--attention``).
"""
from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vlmcompress.api import load_all  # noqa: E402
from vlmcompress.eval.tasks import box_iou, file_images, ref_box  # noqa: E402
from vlmcompress.lvlm.load import load_lvlm  # noqa: E402
from vlmcompress.lvlm.tokenizer import number_tokens  # noqa: E402


def box_answer(box: tuple[float, float, float, float]) -> str:
    """The LLaVA-1.5 box text of a normalised box, as the embedded model is trained to write it."""
    return "[" + ", ".join(f"{min(max(v, 0.0), 1.0):.2f}" for v in box) + "]"


class LayerStates:
    """Forward hooks that keep each LM decoder layer's output of the last call: ``states[l]
    [B, T, D]``. A context manager; the hooks are removed on exit."""

    def __init__(self, lvlm) -> None:
        self.layers = list(lvlm.language_model.layers)
        self.states: list[torch.Tensor | None] = [None] * len(self.layers)
        self.handles: list = []

    def __enter__(self) -> "LayerStates":
        for i, layer in enumerate(self.layers):
            def keep(module, args, out, i=i) -> None:
                self.states[i] = (out[0] if isinstance(out, tuple) else out).detach()
            self.handles.append(layer.register_forward_hook(keep))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


class AttentionMaps:
    """Forward hooks that keep each LM layer's attention weights of the last call: ``maps[l]
    [B, H, T, T]``. A context manager: the LM runs its eager attention (the one that returns
    the weights) inside the block, and its own implementation again after it."""

    def __init__(self, lvlm) -> None:
        self.lvlm = lvlm
        self.layers = list(lvlm.language_model.layers)
        self.maps: list[torch.Tensor | None] = [None] * len(self.layers)
        self.handles: list = []
        self.before = lvlm.language_model.config._attn_implementation

    def __enter__(self) -> "AttentionMaps":
        self.lvlm.llava.set_attn_implementation("eager")
        for i, layer in enumerate(self.layers):
            def keep(module, args, out, i=i) -> None:
                self.maps[i] = out[1].detach()
            self.handles.append(layer.self_attn.register_forward_hook(keep))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.lvlm.llava.set_attn_implementation(self.before)


def box_patches(box: tuple[float, float, float, float], grid: int) -> torch.Tensor:
    """``[grid * grid]`` bool, row-major: the patches whose centre lies in the normalised box
    ``(x1, y1, x2, y2)``, and always the one holding the box's centre."""
    c = (torch.arange(grid) + 0.5) / grid
    inside_x, inside_y = (c >= box[0]) & (c <= box[2]), (c >= box[1]) & (c <= box[3])
    out = inside_y[:, None] & inside_x[None, :]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    out[min(int(cy * grid), grid - 1), min(int(cx * grid), grid - 1)] = True
    return out.flatten()


def slot_mass(maps: list[torch.Tensor], slots: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Mean attention mass of the query positions ``slots [S]`` on the key positions ``keys
    [T]`` (bool), per layer and head, from ``maps`` (each ``[1, H, T, T]``) -> ``[L, H]``."""
    return torch.stack([m[0][:, slots][:, :, keys].sum(-1).mean(-1) for m in maps])


@torch.inference_mode()
def forced_coordinates(lvlm, image: torch.Tensor, sentence: str, answer: str, ids: torch.Tensor,
                       values: torch.Tensor, layers: LayerStates | None = None,
                       attention: tuple[AttentionMaps, torch.Tensor] | None = None
                       ) -> tuple[list[float], int, torch.Tensor | None, torch.Tensor | None]:
    """Teacher-forced ``answer`` after the grounding prompt for ``sentence``: at each slot whose
    next token is a coordinate, the restricted argmax's value -> (values, slots where the
    unrestricted argmax is a number, with ``layers`` each layer's hidden state at those slots
    ``[L, S, D]``, with ``attention`` = (maps, object patches ``[N]`` bool) the slots' mean
    attention mass per layer and head on the object and on the whole image, and that of the
    referring expression's last token on the object ``[3, L, H]``)."""
    logits, nxt = lvlm.answer_logits(image[None], [sentence], [answer], task="ground")
    logits, nxt = logits[0], nxt[0]
    slots = torch.isin(nxt, ids).nonzero().flatten()
    got = logits[slots][:, ids].argmax(-1)
    is_number = torch.isin(logits[slots].argmax(-1), ids).sum().item()
    states = torch.stack([h[0, slots] for h in layers.states]) if layers is not None else None
    mass = None
    if attention is not None:
        maps, patches = attention
        pre, post = lvlm._prompt_ids("ground", [sentence])[0]        # the image follows the prompt's prefix
        start, n = len(pre), len(patches)
        obj, img = torch.zeros(nxt.shape[0] + 1, dtype=torch.bool), torch.zeros(nxt.shape[0] + 1, dtype=torch.bool)
        obj[start:start + n], img[start:start + n] = patches, True
        # The referring expression's last token (the head noun), where a two-hop route would gather the object.
        last = lvlm.tokenizer(sentence, add_special_tokens=False).input_ids[-1]
        word = [start + n + i for i, t in enumerate(post) if t == last][-1:] or [int(slots[0])]
        mass = torch.stack([slot_mass(maps.maps, slots, obj), slot_mass(maps.maps, slots, img),
                            slot_mass(maps.maps, torch.tensor(word), obj)])
    return values[got].tolist(), int(is_number), states, mass


SMALL_SIDE = 0.15


def size_accuracy(boxes: np.ndarray, hits: np.ndarray, small_side: float = SMALL_SIDE) -> dict[str, tuple[float, int]]:
    """Accuracy (percent) and count of ``hits [R]`` for the small and the large ``boxes [R, 4]``
    (normalised ``x1, y1, x2, y2``; small: mean side below ``small_side``); a group with no box
    is left out."""
    small = ((boxes[:, 2] - boxes[:, 0]) + (boxes[:, 3] - boxes[:, 1])) / 2 < small_side
    return {name: (100 * float(hits[m].mean()), int(m.sum())) for name, m in (("small", small), ("large", ~small))
            if m.any()}


def probe_mae(x: np.ndarray, y: np.ndarray, lam: float = 1e-2) -> float:
    """Mean absolute error of a ridge regression ``x [M, D]`` -> ``y [M]``, each half of a
    fixed random split predicted by a fit on the other (features standardised on the fit half)."""
    half = np.random.default_rng(0).permutation(len(x)) % 2 == 0
    err = []
    for fit in (half, ~half):
        mu, sd = x[fit].mean(0), x[fit].std(0)
        sd = sd + 0.05 * sd.mean()
        a = np.c_[(x[fit] - mu) / sd, np.ones(fit.sum())]
        b = np.c_[(x[~fit] - mu) / sd, np.ones((~fit).sum())]
        w = np.linalg.solve(a.T @ a + lam * len(a) * np.eye(a.shape[1]), a.T @ y[fit])
        err.append(np.abs(b @ w - y[~fit]))
    return float(np.concatenate(err).mean())


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="folder with llava/ and clip/ (a trial's or the stage's model)")
    ap.add_argument("--refs", type=int, default=300, help="test referring expressions to probe")
    ap.add_argument("--layers", action="store_true", help="also a linear probe of each coordinate at every LM layer")
    ap.add_argument("--attention", action="store_true",
                    help="also the coordinate tokens' attention on the object, per layer and head")
    args = ap.parse_args(argv)
    if not (args.model / "llava").is_dir() or not (args.model / "clip").is_dir():
        print(f"grounding_probe: {args.model} has no llava/ and clip/ folders", file=sys.stderr)
        return 2
    lvlm = load_lvlm(str(args.model / "llava"), str(args.model / "clip"))
    ids, values = number_tokens(lvlm.tokenizer.get_vocab())
    test = load_all()["test"]
    items = [(r, ref) for r in test for ref in r.refs][:args.refs]
    vc = lvlm.llava.config.vision_config
    grid = vc.image_size // vc.patch_size
    errors, hits, numbers, slots, states, truths, masses = [], [], 0, 0, [], [], []
    with LayerStates(lvlm) as layers, AttentionMaps(lvlm) if args.attention else nullcontext() as maps:
        for rec, ref in items:
            box = ref_box(rec, ref.bbox, lvlm.image_aspect)
            truth = tuple(round(min(max(v, 0.0), 1.0), 2) for v in box)
            got, n, st, mass = forced_coordinates(lvlm, file_images(rec), ref.sentence, box_answer(truth), ids, values,
                                                  layers if args.layers else None,
                                                  (maps, box_patches(box, grid)) if maps is not None else None)
            if len(got) != 4:
                continue
            if st is not None:
                states.append(st.float().numpy())
            if mass is not None:
                masses.append(mass.float().numpy())
            truths.append(truth)
            errors.append(np.abs(np.array(got) - np.array(truth)))
            hits.append(box_iou(tuple(got), ref_box(rec, ref.bbox, lvlm.image_aspect)) >= 0.5)
            numbers, slots = numbers + n, slots + 4
    err = np.mean(errors, axis=0)
    print(f"refs {len(errors)}; mean |error| x1 {err[0]:.3f} y1 {err[1]:.3f} x2 {err[2]:.3f} y2 {err[3]:.3f}; "
          f"argmax is a number at {100 * numbers / max(slots, 1):.1f} % of slots; "
          f"teacher-forced acc@0.5 {100 * np.mean(hits):.1f} %")
    by_size = size_accuracy(np.array(truths), np.array(hits))
    print("teacher-forced acc@0.5 by box size: "
          + ", ".join(f"{k} {acc:.1f} % of {n}" for k, (acc, n) in by_size.items()))
    if masses:
        m = np.mean(masses, axis=0)                            # [3, L, H]
        heads = lambda row: " ".join(f"{v:.2f}" for v in row)  # noqa: E731
        for layer in range(m.shape[1]):
            print(f"layer {layer + 1} attention per head: coordinate tokens on the object {heads(m[0, layer])}, "
                  f"on the image {heads(m[1, layer])}; the expression's last word on the object {heads(m[2, layer])}")
    if args.layers and len(states) >= 8:
        st, y = np.stack(states), np.array(truths)             # [R, L, 4, D], [R, 4]
        for layer in range(st.shape[1]):
            maes = [probe_mae(st[:, layer, j], y[:, j]) for j in range(4)]
            print(f"layer {layer + 1} linear probe at each coordinate's token: mean |error| "
                  + " ".join(f"{n} {m:.3f}" for n, m in zip(("x1", "y1", "x2", "y2"), maes)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
