"""The miniature paper world loads through the ordinary transformers entry points."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from paper_world import (CLIP_MEAN, CLIP_STD, archive_world, build_clip, build_llava15, build_llava15_pair,
                         build_llava_next, build_qwen2_vl, corpus, official_archives, pil_images,
                         sentencepiece_model, train2017_archive)
from PIL import Image
from transformers import (AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, CLIPModel,
                          LlavaForConditionalGeneration)

from vlmcompress.data.prepare_coco import prepare_from_archives
from vlmcompress.data.records import load_split
from vlmcompress.lvlm.imageprep import prepare
from vlmcompress.lvlm.load import load_lvlm

QUESTION = "What is the man holding?"
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def llava15(tmp_path_factory) -> tuple[Path, Path]:
    return build_llava15_pair(tmp_path_factory.mktemp("paper") / "llava-1.5")


def _tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255


def _generate(folder: Path, images: list[Image.Image], n_image_tokens: list[int]) -> None:
    """Processor-built inputs: ``<image>`` expands to ``n_image_tokens``; generation appends tokens."""
    proc = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    prompt = proc.apply_chat_template(MESSAGES, add_generation_prompt=True)
    image_id = getattr(model.config, "image_token_id", None) or model.config.image_token_index
    for im, n in zip(images, n_image_tokens):
        enc = proc(images=[im], text=prompt, return_tensors="pt")
        assert int((enc.input_ids == image_id).sum()) == n
        out = model.generate(**enc, max_new_tokens=3, do_sample=False)
        assert enc.input_ids.shape[1] < out.shape[1] <= enc.input_ids.shape[1] + 3
    batch = proc(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True)
    assert model.generate(**batch, max_new_tokens=2, do_sample=False).shape[0] == len(images)


# --- tokenizers ---------------------------------------------------------------------------

def test_llama_tokenizer_is_sentencepiece_with_split_digits(llava15):
    tok = AutoTokenizer.from_pretrained(llava15[0])
    ids = tok("[0.12, 0.34, 0.56, 0.78]", add_special_tokens=False).input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("012034056078")   # one digit a token
    assert tok.decode(ids) == "[0.12, 0.34, 0.56, 0.78]"
    enc = tok("USER: <image>\nWhat is it? ASSISTANT:").input_ids
    assert enc[0] == tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.unk_token_id == 0
    assert enc.count(tok.convert_tokens_to_ids("<image>")) == 1
    assert "<0x0A>" in tok.convert_ids_to_tokens(enc)                      # newline by byte fallback, as Llama
    assert tok.convert_ids_to_tokens(tok("Ω", add_special_tokens=False).input_ids)[-2:] == ["<0xCE>", "<0xA9>"]
    assert tok.pad_token == "<pad>" and tok.padding_side == "left"
    # The fast tokenizer encodes as the SentencePiece model it was converted from.
    sp = spm.SentencePieceProcessor(model_proto=(llava15[0] / "tokenizer.model").read_bytes())
    assert sp.serialized_model_proto() == sentencepiece_model()
    for text in corpus(seed=1, n=20):
        text = text.replace("<image>", "image")
        assert tok(text, add_special_tokens=False).input_ids == sp.encode(text), text


def test_clip_tokenizer_is_clips_bpe(llava15):
    tok = AutoTokenizer.from_pretrained(llava15[1])
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    pieces = tok.convert_ids_to_tokens(tok("A man riding a WAVE on top of a surfboard.").input_ids)
    assert pieces == ["<|startoftext|>", "a</w>", "man</w>", "riding</w>", "a</w>", "wave</w>", "on</w>", "top</w>",
                      "of</w>", "a</w>", "surf", "board</w>", ".</w>", "<|endoftext|>"]      # lower-cased, sub-words
    vocab = json.loads((llava15[1] / "vocab.json").read_text())
    assert vocab["<|endoftext|>"] == 49407
    assert (llava15[1] / "merges.txt").read_text().startswith("#version: 0.2\ni n\n")


# --- llava-1.5 + CLIP -----------------------------------------------------------------------

def test_llava15_processor_and_generate(llava15):
    llava, _ = llava15
    proc = AutoProcessor.from_pretrained(llava)
    assert type(proc).__name__ == "LlavaProcessor" and type(proc.image_processor).__name__ == "LlavaImageProcessor"
    prompt = proc.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert prompt == f"USER: <image>\n{QUESTION} ASSISTANT:"
    im = pil_images([(640, 427)])[0]
    enc = proc(images=im, text=prompt, return_tensors="pt")
    assert enc.pixel_values.shape == (1, 3, 336, 336)
    # expand2square: the bands above and below a landscape image are the mean colour (about 0).
    assert enc.pixel_values[0, :, :40].abs().max() < 0.02 and enc.pixel_values[0, :, 168].abs().mean() > 0.1
    _generate(llava, pil_images([(640, 427), (480, 640)]), [576, 576])


def test_llava15_odd_grid(tmp_path):
    folder = build_llava15(tmp_path / "odd", image_size=98, patch_size=14)
    cfg = LlavaForConditionalGeneration.from_pretrained(folder).config
    assert (cfg.vision_config.image_size, cfg.image_seq_length) == (98, 49)
    _generate(folder, pil_images([(500, 375)]), [49])


def test_clip_folder_shares_the_llava_tower(llava15):
    llava = LlavaForConditionalGeneration.from_pretrained(llava15[0])
    clip = CLIPModel.from_pretrained(llava15[1])
    tower, own = llava.model.vision_tower.state_dict(), clip.vision_model.state_dict()
    assert tower.keys() == own.keys() and all(torch.equal(tower[k], own[k]) for k in tower)
    assert clip.config.vision_config.to_dict() == llava.config.vision_config.to_dict()
    assert AutoProcessor.from_pretrained(llava15[1]).image_processor.crop_size["height"] == 336


def test_load_lvlm_answers_images_of_two_sizes(llava15):
    lvlm = load_lvlm(str(llava15[0]), str(llava15[1]))
    images = [_tensor(im) for im in pil_images([(640, 427), (480, 640)])]
    feats = lvlm.visual_features(images)
    assert feats.tokens.shape == (2, 576, 32) and feats.grid == (24, 24) and feats.cls_attn.shape == (2, 576)
    answers = lvlm.generate(images, ["What color is the bus?", "How many dogs are there?"], max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert lvlm.text_embeddings(["a photo of a cat"]).shape == (1, 16)


def test_pad_preprocessing_matches_the_llava_processor(llava15):
    """The package's differentiable ``pad`` path gives the HF processor's pixels (to resampling noise)."""
    proc = AutoProcessor.from_pretrained(llava15[0]).image_processor
    for im in pil_images([(640, 427), (480, 640), (500, 375)]):
        ref = proc(im, return_tensors="pt").pixel_values
        ours = prepare([_tensor(im)], 336, "pad", CLIP_MEAN, CLIP_STD)
        assert (ours - ref).abs().mean() < 2e-3 and (ours - ref).abs().max() < 0.05


def test_builds_are_deterministic(tmp_path):
    a = build_llava15(tmp_path / "a", image_size=28)
    b = build_llava15(tmp_path / "b", image_size=28)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    assert build_clip(tmp_path / "c").joinpath("config.json").is_file()


# --- LLaVA-NeXT and Qwen2-VL ---------------------------------------------------------------

def test_llava_next_anyres(tmp_path):
    folder = build_llava_next(tmp_path / "next")
    proc = AutoProcessor.from_pretrained(folder)
    im = pil_images([(640, 427)])[0]
    enc = proc(images=[im], text=proc.apply_chat_template(MESSAGES, add_generation_prompt=True), return_tensors="pt")
    assert enc.pixel_values.shape == (1, 5, 3, 56, 56) and enc.image_sizes.tolist() == [[427, 640]]
    # 16 base tokens + the 2x2-tile grid of 8x8 patches unpadded to the image's aspect (6 rows of 8
    # for 640x427, 8 rows of 6 for 480x640), each row ending in a newline token: 16 + 6 * 9 = 70
    _generate(folder, pil_images([(640, 427), (480, 640), (612, 612)]), [70, 72, 88])


def test_qwen2_vl_dynamic_resolution(tmp_path):
    folder = build_qwen2_vl(tmp_path / "qwen")
    proc = AutoProcessor.from_pretrained(folder)
    assert type(proc.tokenizer).__name__ == "Qwen2Tokenizer"
    prompt = proc.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert prompt.endswith(f"<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    enc = proc(images=[pil_images([(640, 427)])[0]], text=prompt, return_tensors="pt")
    assert enc.image_grid_thw.tolist() == [[1, 6, 8]] and enc.pixel_values.shape == (48, 3 * 2 * 14 * 14)
    _generate(folder, pil_images([(640, 427), (480, 640), (612, 612)]), [12, 12, 16])


# --- archives -------------------------------------------------------------------------------

def test_official_archives_have_mixed_coco_sizes_and_prepare(tmp_path):
    arcs = official_archives()
    assert arcs == official_archives() and sum(map(len, arcs.values())) < 200_000
    with zipfile.ZipFile(io.BytesIO(arcs["val2017.zip"])) as zf:
        names = zf.namelist()
        sizes = [Image.open(io.BytesIO(zf.read(n))).size for n in names]
        exif = [bool(Image.open(io.BytesIO(zf.read(n))).getexif()) for n in names]
    assert names[0] == "val2017/000000000139.jpg" and len(set(sizes)) == 8 and exif.count(True) == 1
    assert {(640, 427), (480, 640), (500, 375), (612, 612)} <= set(sizes)
    keys = {"val2017.zip": "coco_val_images", "annotations_trainval2017.zip": "coco_annotations",
            "v2_Questions_Val_mscoco.zip": "vqa_questions", "v2_Annotations_Val_mscoco.zip": "vqa_annotations",
            "refcoco.zip": "refcoco"}
    paths = {}
    for name, data in arcs.items():
        (tmp_path / name).write_bytes(data)
        paths[keys[name]] = tmp_path / name
    counts = prepare_from_archives(paths, tmp_path / "ds")
    world = archive_world()
    assert counts["test_images"] == 8 and counts["test_questions"] == 12 and counts["test_refs"] == 8
    assert counts["test_objects"] == len(world.instances["annotations"]) and counts["test_captions"] == 40
    recs = load_split(tmp_path / "ds", "test")
    assert [(r.width, r.height) for r in recs] == sizes
    assert all(bool(r.questions) != bool(r.refs) for r in recs)       # val2014 xor train2014


def test_train2017_archive_has_the_official_layout_out_of_name_order():
    data = train2017_archive(10)
    assert data == train2017_archive(10)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
        files = [i.filename for i in infos if not i.is_dir()]
        sizes = {Image.open(io.BytesIO(zf.read(n))).size for n in files}
    assert infos[0].filename == "train2017/" and infos[0].is_dir()
    assert len(files) == 10 and files != sorted(files)
    assert sorted(files)[:3] == ["train2017/000000000009.jpg", "train2017/000000000025.jpg",
                                 "train2017/000000000030.jpg"]
    assert len(sizes) > 4                                             # COCO's mixed sizes
    assert b"\x01\x00\x10\x00" in data[infos[-1].header_offset:infos[-1].header_offset + 80]  # zip64 extra
    world_ids = {im["id"] for im in archive_world().images}
    assert not world_ids & {int(n.split("/")[1][:-4]) for n in files}   # disjoint from val2017
