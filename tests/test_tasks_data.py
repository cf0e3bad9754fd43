"""Task data on digits-scenes (deterministic, split by scan, labels right) and the benchmark file readers."""

import json
from collections import Counter

import pytest
import torch

from vlcore.data.digits_scenes import ANSWERS
from vlcore.data.tasks import TASKS, TaskData, vqa_answer_index
from vlcore.data.tasks_batch import TaskSource, collate, qa_sequences
from vlcore.data.tasks_readers import read_coco_captions, read_karpathy, read_nlvr2, read_refcoco, read_vqav2
from vlcore.data.tokenizer import ByteBPETokenizer

N = 60


@pytest.fixture(scope="module")
def tok():
    return ByteBPETokenizer.train(["a 3 left of a 7", "how many digits ?", "the left 3", "there is no 5"],
                                  vocab_size=300)


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_and_split_by_scan(task):
    a, b = TaskData(task, "train"), TaskData(task, "train")
    for i in (0, 7):
        ea, eb = a.example(i), b.example(i)
        assert ea.text == eb.text and ea.label == eb.label
        assert all((x.image == y.image).all() for x, y in zip(ea.images, eb.images))
    train, test = set(TaskData(task, "train").scenes.scan_ids), set(TaskData(task, "test").scenes.scan_ids)
    assert not train & test


def test_vqa_answers_are_the_scene_answer_or_its_numeral():
    for e in TaskData("vqa", "train").examples(range(N)):
        assert len(e.answers) == 10 and Counter(e.answers).most_common(1)[0][0] == e.label
        s = e.images[0]
        if e.text.startswith("how many"):
            assert set(ANSWERS[a] for a in e.answers) <= {("one", "two", "three")[len(s.digits) - 1],
                                                          str(len(s.digits))}
        else:
            assert set(e.answers) == {s.digits[0] if "first" in e.text else s.digits[-1]}


def test_grounding_phrase_names_the_boxed_digit_unambiguously():
    for e in TaskData("grounding", "train").examples(range(N)):
        s = e.images[0]
        j = s.boxes.index(e.box)
        d = s.digits[j]
        assert e.text.endswith(str(d))
        if s.digits.count(d) == 1:
            assert e.text == f"the {d}"
        else:
            word = e.text.split()[1]
            same = [k for k, x in enumerate(s.digits) if x == d]
            assert (word in ("left", "top")) == (j == same[0]) and (word in ("right", "bottom")) == (j == same[-1])


def test_nlvr2_labels_match_the_statement_and_are_balanced():
    ex = TaskData("nlvr2", "train").examples(range(200))
    for e in ex:
        d = int(e.text.split()[-1])
        inl, inr = d in e.images[0].digits, d in e.images[1].digits
        truth = (inl and inr) if e.text.startswith("both") else (inl != inr)
        assert e.label == int(truth)
    assert 0.35 < sum(e.label for e in ex) / len(ex) < 0.65


def test_ve_labels():
    ex = TaskData("ve", "train").examples(range(150))
    for e in ex:
        d = int([w for w in e.text.split() if w.isdigit()][0])
        shown = d in e.images[0].digits
        if "written by" in e.text:
            assert e.label == 1
        elif "no" in e.text.split():
            assert e.label == 2 and shown
        else:
            assert e.label == (0 if shown else 2)
    assert set(Counter(e.label for e in ex)) == {0, 1, 2}


def test_vcr_one_right_option():
    for e in TaskData("vcr", "train").examples(range(N)):
        assert len(e.options) == 4 and len(set(e.options)) == 4
        assert e.options[e.label] == ANSWERS[e.images[0].answer]


def test_captioning_references():
    e = TaskData("captioning", "test").example(3)
    assert e.references[0] == e.images[0].caption and e.references[1] != e.references[0]


@pytest.mark.parametrize("task", TASKS)
def test_batches(task, tok):
    src = TaskSource(TaskData(task, "train"), tok, max_text_len=16, batch_size=4)
    b0 = src.next_batch()
    assert b0["image"].shape == (4, 3, 64, 64) and b0["text"].shape == (4, 16 if task != "vcr" else 11)
    src.load_state_dict({"position": 0})
    assert torch.equal(src.next_batch()["text"], b0["text"])  # the data position regenerates the batch
    if task == "vcr":
        assert b0["options"].shape[:2] == (4, 4) and b0["text"].shape[1] + b0["options"].shape[2] - 1 <= 16
    if task == "nlvr2":
        assert b0["image_right"].shape == b0["image"].shape


def test_qa_sequences_prefix_is_the_question(tok):
    ids, mask, prefix = qa_sequences(tok, ["how many digits ?"], ["two"], 32)
    q = tok.encode("how many digits ?")
    assert prefix.tolist() == [1 + len(q)] and ids[0, 1:1 + len(q)].tolist() == q
    assert tok.decode(ids[0, prefix[0]:].tolist()).strip() == "two"
    b = collate("vqa", TaskData("vqa").examples(range(2)), tok, 16)
    assert b["answers"].shape == (2, 10)


def test_vqa_answer_index():
    assert vqa_answer_index(" 7 ") == ANSWERS.index("7")
    assert vqa_answer_index("two") == ANSWERS.index("two") and vqa_answer_index("five") == ANSWERS.index("5")
    assert vqa_answer_index("banana") == -1


# ---- readers of the real benchmarks' files --------------------------------------------------------------------
def test_read_vqav2(tmp_path):
    q = {"questions": [{"image_id": 9, "question": "What color?", "question_id": 90}]}
    a = {"annotations": [{"question_id": 90, "image_id": 9, "multiple_choice_answer": "red",
                          "answers": [{"answer": "red", "answer_id": i + 1} for i in range(9)]
                          + [{"answer": "blue", "answer_id": 10}]}]}
    (tmp_path / "q.json").write_text(json.dumps(q))
    (tmp_path / "a.json").write_text(json.dumps(a))
    [r] = read_vqav2(tmp_path / "q.json", tmp_path / "a.json")
    assert r["question"] == "What color?" and r["answers"].count("red") == 9 and r["answer"] == "red"
    (tmp_path / "bad.json").write_text(json.dumps({"qs": []}))
    with pytest.raises(ValueError, match="'questions'"):
        read_vqav2(tmp_path / "bad.json")


def test_read_refcoco(tmp_path):
    data = {"images": [{"id": 1, "width": 200, "height": 100, "file_name": "x.jpg"}],
            "annotations": [{"id": 5, "image_id": 1, "bbox": [20, 10, 40, 50]}],
            "refs": [{"ref_id": 0, "ann_id": 5, "image_id": 1, "split": "val",
                      "sentences": [{"sent": "man left"}, {"sent": "the man"}]}]}
    (tmp_path / "r.json").write_text(json.dumps(data))
    rows = read_refcoco(tmp_path / "r.json")
    assert [r["phrase"] for r in rows] == ["man left", "the man"]
    assert rows[0]["box"] == pytest.approx((40 / 200, 35 / 100, 40 / 200, 50 / 100))
    assert read_refcoco(tmp_path / "r.json", split="train") == []


def test_read_nlvr2(tmp_path):
    lines = [{"identifier": "dev-850-0-0", "sentence": "two dogs", "label": "True"},
             {"identifier": "dev-850-0-1", "sentence": "one cat", "label": "False"}]
    (tmp_path / "d.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rows = read_nlvr2(tmp_path / "d.json")
    assert [r["label"] for r in rows] == [True, False]
    assert rows[0]["left"] == "dev-850-0-img0.png" and rows[0]["right"] == "dev-850-0-img1.png"
    (tmp_path / "e.json").write_text(json.dumps({"identifier": "a-1", "sentence": "s", "label": "yes"}))
    with pytest.raises(ValueError, match="label"):
        read_nlvr2(tmp_path / "e.json")


def test_read_coco_and_karpathy(tmp_path):
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 1, "caption": "a dog "}, {"image_id": 1, "caption": "dog"},
                            {"image_id": 2, "caption": "cat"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert read_coco_captions(tmp_path / "c.json") == {"a.jpg": ["a dog", "dog"], "b.jpg": ["cat"]}
    k = {"images": [{"filepath": "val2014", "filename": "a.jpg", "split": "restval", "sentences": [{"raw": "x"}]},
                    {"filepath": "val2014", "filename": "b.jpg", "split": "test", "sentences": [{"raw": "y"}]}]}
    (tmp_path / "k.json").write_text(json.dumps(k))
    out = read_karpathy(tmp_path / "k.json")
    assert out["train"] == [{"file": "val2014/a.jpg", "captions": ["x"]}] and len(out["test"]) == 1
