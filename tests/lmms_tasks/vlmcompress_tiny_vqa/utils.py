"""Visual and prompt of one row of the tiny VQA task (images live beside this file)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

IMAGES = Path(__file__).resolve().parent / "images"
INSTRUCTION = "Answer the question using a single word or phrase."   # llava-1.5's short-answer prompt


def doc_to_visual(doc: dict) -> list[Image.Image]:
    """The row's image, decoded as RGB."""
    with Image.open(IMAGES / doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc: dict) -> str:
    return f"{doc['question']}\n{INSTRUCTION}"
