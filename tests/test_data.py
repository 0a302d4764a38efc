import numpy as np
import pytest

from edgeft.data import k_shot, load_dataset
from edgeft.errors import EdgeftError

LABELS = ["neg", "pos"]


def test_jsonl_csv_tsv_read_the_same(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "good", "label": "pos"}\n\n{"text": "bad", "label": 0}\n')
    (tmp_path / "d.csv").write_text('text,label\ngood,pos\n"bad, really",0\n')
    (tmp_path / "d.tsv").write_text("label\ttext\npos\tgood\nneg\tbad\n")
    for name in ("d.jsonl", "d.csv", "d.tsv"):
        data = load_dataset(tmp_path / name, LABELS)
        assert data.labels.tolist() == [1, 0]
    assert load_dataset(tmp_path / "d.csv", LABELS).texts[1] == "bad, really"


def test_custom_field_names(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"sentence": "good", "y": "pos"}\n')
    data = load_dataset(tmp_path / "d.jsonl", LABELS, text_field="sentence", label_field="y")
    assert data.texts == ["good"] and data.labels.tolist() == [1]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("e.jsonl", "", "no examples"),
        ("m.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label"\n', "m.jsonl:2: not valid JSON"),
        ("u.jsonl", '{"text": "a", "label": "maybe"}\n', "unknown label 'maybe'"),
        ("r.jsonl", '{"text": "a", "label": 2}\n', "label id 2 is out of range"),
        ("c.csv", "sentence,label\na,pos\n", "no column 'text'"),
        ("t.jsonl", '{"text": "", "label": "pos"}\n', "empty or not text"),
        ("l.jsonl", '{"text": "a"}\n', "no field 'label'"),
        ("x.parquet", "x", "unknown data format"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(EdgeftError, match=message):
        load_dataset(tmp_path / name, LABELS)


def test_k_shot_is_balanced_and_seeded(tmp_path):
    from edgeft.data import Dataset

    data = Dataset([f"t{i}" for i in range(100)], np.array([i % 3 for i in range(100)]))
    a, b = k_shot(data, 5, seed=1), k_shot(data, 5, seed=1)
    assert np.bincount(a.labels).tolist() == [5, 5, 5]
    assert a.texts == b.texts
    assert k_shot(data, 5, seed=2).texts != a.texts
