"""The task registry, task validation and task files."""

from __future__ import annotations

import dataclasses
import json

import pytest

from qanalyze.errors import ConfigError, UnknownTaskError
from qanalyze.metrics import METRICS
from qanalyze.tasks import TASKS, TaskSpec, get_task, register_task

GLUE_NAMES = {"sst2", "mrpc", "rte", "stsb", "cola", "qnli", "mnli", "qqp"}


def _spec(**changes: object) -> TaskSpec:
    fields = {
        "name": "custom",
        "text_columns": ("text",),
        "label_column": "label",
        "labels": ("neg", "pos"),
        "metrics": ("accuracy",),
        "glue_dir": "CUSTOM",
    }
    return TaskSpec(**{**fields, **changes})


def test_registry_holds_the_glue_tasks():
    assert set(TASKS) >= GLUE_NAMES


@pytest.mark.parametrize("name", sorted(GLUE_NAMES))
def test_every_registered_task_validates(name):
    spec = TASKS[name]
    assert spec.name == name
    assert dataclasses.replace(spec) == spec  # runs __post_init__ again
    assert 1 <= len(spec.text_columns) <= 2
    assert all(m in METRICS for m in spec.metrics)
    assert spec.main_metric == spec.metrics[0]
    assert spec.num_labels == (1 if spec.labels is None else len(spec.labels))
    assert len(spec.hub_texts) == len(spec.text_columns)
    assert TaskSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_glue_column_names_labels_and_metrics():
    sst2, mrpc, rte, stsb = (TASKS[n] for n in ("sst2", "mrpc", "rte", "stsb"))
    assert (sst2.text_columns, sst2.label_column, sst2.labels, sst2.glue_dir) == (
        ("sentence",), "label", ("0", "1"), "SST-2")
    assert (mrpc.text_columns, mrpc.label_column, mrpc.metrics) == (
        ("#1 String", "#2 String"), "Quality", ("f1", "accuracy"))
    assert mrpc.hub_texts == ("sentence1", "sentence2")
    assert rte.labels == ("entailment", "not_entailment")  # hub: entailment = 0
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.label_range == (0.0, 5.0)
    assert (stsb.label_column, stsb.metrics, stsb.main_metric) == ("score", ("pearson", "spearman"), "pearson")
    assert not sst2.is_regression and sst2.num_labels == 2


def test_other_glue_tasks():
    cola, qnli, mnli, qqp = (TASKS[n] for n in ("cola", "qnli", "mnli", "qqp"))
    assert cola.columns == ("source", "label", "original_label", "sentence")
    assert cola.main_metric == "mcc"
    assert qnli.text_columns == ("question", "sentence") and qnli.labels == ("entailment", "not_entailment")
    assert mnli.labels == ("entailment", "neutral", "contradiction") and mnli.num_labels == 3
    assert (mnli.label_column, mnli.dev_file, mnli.hub_dev_split) == (
        "gold_label", "dev_matched.tsv", "validation_matched")
    assert mnli.hub_texts == ("premise", "hypothesis")
    assert (qqp.text_columns, qqp.label_column, qqp.main_metric) == (
        ("question1", "question2"), "is_duplicate", "f1")
    assert {t.hub_config for t in TASKS.values() if t.name in GLUE_NAMES} == GLUE_NAMES


def test_get_task_by_name_ignores_case_and_dashes():
    assert get_task("sst2") is TASKS["sst2"]
    assert get_task("SST-2") is TASKS["sst2"]
    assert get_task("STS-B") is TASKS["stsb"]


def test_unknown_task_lists_known_names():
    with pytest.raises(UnknownTaskError) as info:
        get_task("imdb")
    message = str(info.value)
    assert message.startswith("unknown task 'imdb'; known tasks: cola, lm, mnli, mrpc, qnli, qqp, rte, sst2, stsb")
    assert "\n" not in message


def test_missing_task_file_is_unknown(tmp_path):
    with pytest.raises(UnknownTaskError, match="no such task file"):
        get_task(str(tmp_path / "nope.json"))


def test_task_from_json_file(tmp_path):
    path = tmp_path / "imdb.json"
    path.write_text(json.dumps({
        "name": "imdb", "text_columns": ["review"], "label_column": "sentiment", "labels": [0, 1],
        "metrics": ["accuracy", "f1"], "glue_dir": "IMDB", "hub_path": "stanfordnlp/imdb",
        "hub_text_columns": ["text"],
    }))
    spec = get_task(str(path))
    assert spec.name == "imdb"
    assert spec.text_columns == ("review",) and spec.hub_texts == ("text",)
    assert spec.labels == ("0", "1")  # numbers in JSON mean the text the files hold
    assert spec.metrics == ("accuracy", "f1")
    assert "imdb" not in TASKS  # reading a file registers nothing


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read task file"),
        ('["a"]', "must be a JSON object"),
        ('{"name": "x"}', "missing field"),
        (json.dumps({"name": "x", "text_columns": ["t"], "label_column": "l", "labels": None,
                     "metrics": ["pearson"], "glue_dir": "X", "colour": "red"}), "unknown task field.*colour"),
        (json.dumps({"name": "x", "text_columns": ["t"], "label_column": "l", "labels": None,
                     "metrics": ["bleu"], "glue_dir": "X"}), "unknown metric 'bleu'"),
    ],
)
def test_bad_task_files(tmp_path, content, message):
    path = tmp_path / "task.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        get_task(str(path))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"text_columns": ()}, "one or two columns"),
        ({"text_columns": ("a", "b", "c")}, "one or two columns"),
        ({"text_columns": "text"}, "must be a list, not the string"),
        ({"metrics": ("accuracy", "bleu")}, "unknown metric 'bleu'; known metrics: accuracy"),
        ({"metrics": ()}, "metrics must be a non-empty list"),
        ({"labels": ()}, "labels must be a non-empty list"),
        ({"labels": ("a", "a")}, "repeat"),
        ({"label_column": "text"}, "also a text column"),
        ({"columns": ("text", "other")}, "lack label"),
        ({"hub_text_columns": ("a", "b")}, "as many columns as text_columns"),
        ({"label_range": (0.0, 5.0)}, "regression tasks only"),
        ({"labels": None, "label_range": (5.0, 0.0)}, "low < high"),
        ({"name": ""}, "non-empty string"),
        ({"labels": ("a", "b", "c"), "metrics": ("accuracy", "f1")}, "f1 needs exactly two labels"),
        ({"labels": None, "metrics": ("f1",)}, "f1 needs exactly two labels"),
    ],
)
def test_spec_validation(changes, message):
    with pytest.raises(ConfigError, match=message):
        _spec(**changes)


def test_lists_become_tuples():
    spec = _spec(text_columns=["a", "b"], metrics=["accuracy"])
    assert spec.text_columns == ("a", "b") and spec.metrics == ("accuracy",)
    hash(spec)


def test_register_task():
    spec = _spec(name="test_custom_task")
    register_task(spec)
    try:
        register_task(spec)  # the same spec again: fine
        assert get_task("test_custom_task") is spec
        with pytest.raises(ConfigError, match="already registered"):
            register_task(dataclasses.replace(spec, labels=("x", "y")))
    finally:
        TASKS.pop("test_custom_task", None)
