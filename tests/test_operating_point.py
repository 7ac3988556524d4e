"""Recall at the operating point (#15.7): evaluate puts it next to AUROC; fit --sensitivity in false alarms per 1 000 parts."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from edgecore.cli import app

runner = CliRunner()


def test_evaluate_reports_recall_and_false_alarms_at_the_stored_threshold(fitted_model_dir, synthetic_category):
    from edgecore.evaluation import evaluate, load_test_set
    from edgecore.model import PatchCoreModel
    from edgecore.report import _summary

    model = PatchCoreModel.load(fitted_model_dir, device="cpu")
    result, records = evaluate(model, load_test_set(synthetic_category, model.preprocess_config))
    labels, flagged = records["labels"], [row["is_anomalous"] for row in records["rows"]]
    caught = sum(f for f, y in zip(flagged, labels) if y) / labels.sum()
    stopped = sum(f for f, y in zip(flagged, labels) if not y) / (labels == 0).sum()
    assert result["recall_at_threshold"] == caught
    assert result["false_alarms_per_1000_at_threshold"] == 1000 * stopped
    keys = list(result)
    assert keys.index("recall_at_threshold") == keys.index("image_auroc") + 1  # next to AUROC, in metrics.json too
    table = "\n".join(_summary(result))
    assert "recall_at_threshold" in table.splitlines()[0]


def test_fit_sensitivity_sets_the_false_alarm_rate(synthetic_category, tmp_path):
    out = tmp_path / "m"
    result = runner.invoke(app, ["fit", str(synthetic_category), "-o", str(out), "--resize", "64", "--crop", "64",
                                 "--sensitivity", "50", "--device", "cpu", "--val-ratio", "0.25"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["threshold"]["false_alarm_rate"] == 0.05
    both = runner.invoke(app, ["fit", str(synthetic_category), "-o", str(tmp_path / "x"), "--sensitivity", "5",
                               "--false-alarm-rate", "0.01"])
    assert both.exit_code == 2 and "not both" in both.output and not (tmp_path / "x").exists()
    bad = runner.invoke(app, ["fit", str(synthetic_category), "-o", str(tmp_path / "x"), "--sensitivity", "1000"])
    assert bad.exit_code == 2 and "per 1 000" in bad.output
