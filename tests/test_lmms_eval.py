"""The lmms-eval model ``vlmcompress`` on a tiny llava-1.5 and the local tasks of tests/lmms_tasks.

Evaluations run in a subprocess (lmms-eval patches process-wide state when it evaluates):
``tests/lmms_tasks/evaluate.py`` calls lmms-eval's evaluator as its command does, with a task
index of that folder alone; the slow test runs the ``lmms-eval`` command itself.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from paper_world import build_llava15, build_llava_next, build_qwen2_vl, pil_images
from vlmcompress.integrations import LMMS_EVAL_MODEL
from vlmcompress.tokens.types import resolve_budget

TASKS = Path(__file__).resolve().parent / "lmms_tasks"
VQA, LL = "vlmcompress_tiny_vqa", "vlmcompress_tiny_vqa_ll"
N_DOCS, N_TOKENS = 6, 576                  # the task's questions; llava-1.5's tokens per image


def offline_env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp / "hf_home"),
            "TOKENIZERS_PARALLELISM": "false"}


def evaluate(runs: dict[str, dict], tmp: Path) -> dict[str, dict]:
    """``runs`` (name -> run of tests/lmms_tasks/evaluate.py) in one subprocess."""
    spec, out = tmp / "runs.json", tmp / "out.json"
    spec.write_text(json.dumps(list(runs.values())))
    proc = subprocess.run([sys.executable, str(TASKS / "evaluate.py"), str(spec), str(out)], env=offline_env(tmp),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dict(zip(runs, json.loads(out.read_text())))


def replies(run: dict, task: str = VQA) -> list[tuple]:
    """(doc_id, raw reply, filtered reply, exact match) of every logged sample."""
    return [(s["doc_id"], json.dumps(s["resps"]), json.dumps(s["filtered_resps"]), s.get("exact_match"))
            for s in run["samples"][task]]


def scores(run: dict, task: str = VQA) -> dict[str, float]:
    return {k: v for k, v in run["results"][task].items() if k.startswith("exact_match,")}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_llava15(tmp_path_factory.mktemp("lmms_model") / "llava")


@pytest.fixture(scope="module")
def runs(checkpoint, tmp_path_factory) -> dict[str, dict]:
    """llava_hf (batch 1), and vlmcompress at budget 1.0 (batch 2) and 0.1 (batches 2 and 1)."""
    ours = f"pretrained={checkpoint},method=recoverable"
    return evaluate({
        "llava_hf": {"model": "llava_hf", "model_args": f"pretrained={checkpoint},device_map=cpu", "batch_size": 1,
                     "tasks": [VQA]},
        "full": {"model": LMMS_EVAL_MODEL, "model_args": f"{ours},budget=1.0", "batch_size": 2, "tasks": [VQA]},
        "tenth": {"model": LMMS_EVAL_MODEL, "model_args": f"{ours},budget=0.1", "batch_size": 2, "tasks": [VQA]},
        "tenth_rows": {"model": LMMS_EVAL_MODEL, "model_args": f"{ours},budget=0.1", "batch_size": 1, "tasks": [VQA]},
    }, tmp_path_factory.mktemp("lmms_runs"))


# --- registration and arguments ---------------------------------------------------------------

def test_entry_point_registers_the_chat_and_simple_models():
    from importlib.metadata import entry_points

    from lmms_eval.models import get_model, list_available_models

    from vlmcompress.integrations.lmms_eval import VlmcompressChat, VlmcompressSimple

    (ep,) = [e for e in entry_points(group="lmms_eval.models") if e.name == LMMS_EVAL_MODEL]
    assert ep.value == "vlmcompress.integrations:lmms_eval_models"
    assert LMMS_EVAL_MODEL in list_available_models()
    assert get_model(LMMS_EVAL_MODEL) is VlmcompressChat and not VlmcompressChat.is_simple
    assert get_model(LMMS_EVAL_MODEL, force_simple=True) is VlmcompressSimple and VlmcompressSimple.is_simple


@pytest.mark.parametrize("args, message", [
    ("method=nope", "unknown method 'nope'"),
    ("method=fastv", "unknown method 'fastv'"),                  # prunes inside the LM: not attachable
    ("method=recoverable,salient_shar=0.5", "unknown argument 'salient_shar'"),
    ("method=recoverable,salient_share=2", "salient_share"),
    ("method=visionzip,budget=none", "visionzip does not have"),
    ("method=recoverable,budget=0", "budget"),
    ("method=recoverable,budget=1.5", "budget"),
    ("method=recoverable,batch_size=auto", "batch_size"),
    ("method=recoverable,dtype=float8", "dtype"),
    ("method=recoverable,attention=max", "attention"),
    ("method=recoverable,attn_layer=1.5", "attn_layer"),
])
def test_bad_model_args_fail_in_one_line_before_loading(args, message):
    from vlmcompress.integrations.lmms_eval import VlmcompressChat

    with pytest.raises(ValueError) as err:        # the folder does not exist: nothing was loaded
        VlmcompressChat.create_from_arg_string(f"pretrained=/nonexistent/model,{args}")
    text = str(err.value)
    assert text.startswith(f"{LMMS_EVAL_MODEL}: ") and message in text and "\n" not in text, text


def test_method_params_are_typed_from_the_method_schema():
    from vlmcompress.integrations.lmms_eval import method_params, parse_budget

    # lmms-eval parses '2' as an int and 'none' as a string; the schema says float / float | None
    assert method_params("recoverable", {"lof_threshold": 2, "text_weight": "none", "recover": False}) == \
        {"lof_threshold": 2.0, "text_weight": None, "recover": False}
    assert parse_budget("recoverable", "none") is None and parse_budget("random", 64) == 64


def test_batches_keep_request_order_and_never_mix_settings():
    from vlmcompress.integrations.lmms_eval import batches, decoding, generated_lengths

    assert batches(["a", "b", "a", "a", "b"], 2) == [[0, 2], [3], [1, 4]]
    assert decoding({"until": ["\n"]}) == {"do_sample": False, "temperature": None, "top_p": None, "num_beams": 1,
                                           "max_new_tokens": 1024}            # llava_hf's defaults
    assert decoding({"temperature": 0.5, "max_new_tokens": 3})["do_sample"]
    eos = 2
    assert generated_lengths(torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8]]), eos) == [2, 4]


def chat_requests(questions: list[str], task: str = "docs") -> list:
    """lmms-eval chat requests whose messages hold image ``i`` of the task's docs and a question."""
    from lmms_eval.api.instance import Instance

    def to_messages(doc: dict) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image", "url": doc["image"]},
                                             {"type": "text", "text": doc["question"]}]}]

    gen = {"max_new_tokens": 4, "until": ["\n\n"]}
    return [Instance("generate_until", (q, to_messages, dict(gen), i, task, "test"), idx=0,
                     metadata={"task": task, "doc_id": i, "repeats": 1}) for i, q in enumerate(questions)]


@pytest.mark.parametrize("build", [build_llava_next, build_qwen2_vl], ids=["llava_next", "qwen2_vl"])
def test_other_architectures_batched_equal_the_stock_model_one_by_one(tmp_path, build):
    from vlmcompress.integrations.lmms_eval import VlmcompressChat

    folder = build(tmp_path / "model")
    images = pil_images(((640, 427), (480, 640), (500, 375)))
    questions = ["What color is the bus?", "How many dogs are there?", "Is there a cat?"]
    docs = [{"image": im, "question": q} for im, q in zip(images, questions)]
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    eos = processor.tokenizer.eos_token_id
    expected = []
    for doc in docs:                       # the stock model, one request at a time
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": doc["question"]}]}]
        prompt = processor.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        inputs = processor(images=[doc["image"]], text=[prompt], return_tensors="pt")
        out = model.generate(**inputs, do_sample=False, max_new_tokens=4, pad_token_id=eos, eos_token_id=eos)
        expected.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    for budget in ("1.0", "0.25"):
        lm = VlmcompressChat.create_from_arg_string(f"pretrained={folder},method=recoverable,budget={budget}",
                                                    {"device": "cpu", "batch_size": 2})
        lm.task_dict = {"docs": {"test": docs}}
        got = [r.text for r in lm.generate_until(chat_requests(questions))]
        kept, total = lm.handle.stats["tokens"], lm.handle.stats["total"]     # the last batch: one image
        if budget == "1.0":
            assert got == expected and kept == total
        else:
            assert len(got) == len(docs) and 0 < kept[0] < total[0]


# --- evaluations ------------------------------------------------------------------------------

def test_budget_one_gives_llava_hf_outputs_and_scores(runs):
    ref, ours = runs["llava_hf"], runs["full"]
    assert len(replies(ref)) == 2 * N_DOCS                     # two filters: reply, first_word
    assert all(json.loads(r[1]) != [[""]] for r in replies(ref))
    assert replies(ours) == replies(ref)
    assert scores(ours) == scores(ref) and set(scores(ref)) == {"exact_match,reply", "exact_match,first_word"}


def test_a_batch_gives_the_outputs_of_its_rows(runs):
    assert replies(runs["tenth"]) == replies(runs["tenth_rows"])
    assert scores(runs["tenth"]) == scores(runs["tenth_rows"])


def test_the_budget_reaches_the_language_model(runs):
    full, tenth = runs["full"]["throughput"], runs["tenth"]["throughput"]
    assert full["avg_visual_tokens_per_image"] == full["avg_visual_tokens_per_image_uncompressed"] == N_TOKENS
    assert tenth["avg_visual_tokens_per_image_uncompressed"] == N_TOKENS
    assert 1 <= tenth["avg_visual_tokens_per_image"] <= resolve_budget(N_TOKENS, 0.1)
    assert replies(runs["tenth"]) != replies(runs["full"])       # fewer tokens, other answers


# --- slow: the command, the simple path and log-likelihood ------------------------------------

def test_the_lmms_eval_command_runs_a_method_in_batches(checkpoint, runs, tmp_path):
    out = tmp_path / "results"
    cmd = [str(Path(sys.executable).parent / "lmms-eval"), "--model", LMMS_EVAL_MODEL,
           "--model_args", f"pretrained={checkpoint},method=recoverable,budget=0.1", "--tasks", VQA,
           "--include_path", str(TASKS), "--batch_size", "2", "--device", "cpu", "--output_path", str(out),
           "--log_samples"]
    proc = subprocess.run(cmd, env=offline_env(tmp_path), capture_output=True, text=True, timeout=900)
    found = list(out.glob("*/*_results.json"))
    assert proc.returncode == 0 and len(found) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]   # errors exit 0
    result = json.loads(found[0].read_text())
    assert {k: result["results"][VQA][k] for k in scores(runs["tenth"])} == scores(runs["tenth"])
    kept = "avg_visual_tokens_per_image"
    assert result["throughput"][kept] == runs["tenth"]["throughput"][kept]
    (samples,) = out.glob(f"*/*_samples_{VQA}.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["filtered_resps"] for r in rows] == [json.loads(r[2])[0] for r in replies(runs["tenth"])]


def load_task_utils():
    """The tiny task's own ``doc_to_text`` and ``doc_to_visual``."""
    spec = importlib.util.spec_from_file_location("tiny_vqa_utils", TASKS / VQA / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stock_loss(model, processor, question: str, answer: str, image) -> tuple[float, bool]:
    """Mean negative log-likelihood of the answer's tokens under the model with no method, by hand."""
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    n = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    inputs = processor(images=[image], text=[prompt + answer], return_tensors="pt")
    with torch.no_grad():
        logp = model(**inputs).logits[0, n - 1:-1].log_softmax(-1)
    target = inputs["input_ids"][0, n:]
    return float(-logp.gather(1, target[:, None]).mean()), bool((logp.argmax(-1) == target).all())


def test_loglikelihood_is_the_mean_token_loss_of_the_continuation(checkpoint):
    """lmms-eval's convention (it takes the argmin over choices). Called directly: lmms-eval 0.7.3's
    evaluator turns every log-likelihood result into a string, so no task can score them."""
    from lmms_eval.api.instance import Instance

    from vlmcompress.integrations.lmms_eval import VlmcompressSimple

    task = load_task_utils()
    docs = [json.loads(line) for line in (TASKS / VQA / "test.jsonl").read_text().splitlines()][:2]
    answers = (" red", " no")
    requests = [Instance("loglikelihood", (task.doc_to_text(d), a, task.doc_to_visual, i, VQA, "test"), idx=k,
                         metadata={"task": VQA, "doc_id": i, "repeats": 1})
                for i, d in enumerate(docs) for k, a in enumerate(answers)]
    got = {}
    for budget in ("1.0", "0.1"):
        lm = VlmcompressSimple.create_from_arg_string(f"pretrained={checkpoint},method=recoverable,budget={budget}",
                                                      {"device": "cpu"})
        lm.task_dict = {VQA: {"test": docs}}
        got[budget] = lm.loglikelihood(requests)
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    expected = [stock_loss(model, processor, task.doc_to_text(d), a, task.doc_to_visual(d)[0])
                for d in docs for a in answers]
    for (loss, greedy), (ref_loss, ref_greedy) in zip(got["1.0"], expected, strict=True):
        assert loss == pytest.approx(ref_loss, abs=1e-5) and greedy == ref_greedy
    assert all(abs(a[0] - b[0]) > 1e-4 for a, b in zip(got["0.1"], got["1.0"], strict=True))


@pytest.mark.slow
def test_the_simple_path_renders_the_chat_paths_prompts(checkpoint, runs, tmp_path):
    """``--force_simple``: the task's text and image as one user turn give the chat path's replies."""
    got = evaluate({"simple": {"model": LMMS_EVAL_MODEL, "model_args": f"pretrained={checkpoint},method=recoverable,"
                               "budget=1.0", "batch_size": 3, "tasks": [VQA], "force_simple": True}}, tmp_path)
    assert replies(got["simple"]) == replies(runs["full"])
