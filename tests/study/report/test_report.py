"""Tests of the study report: figures, HTML/Markdown pages, escaping, degenerate studies."""

from __future__ import annotations

import datetime as dt
import re
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from study.report.html import FIGURES, ReportFiles, build_report, render_markdown_summary
from study.storage.read import read_trials
from study.storage.store import ResultsStore

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
INJECTED = "<script>alert('x')</script>"
# trial_id, status, prune, drop, clip, noise, lr, batch, eps target, final accuracy
TRIALS = [
    ("t00", "completed", 0.0, 0.0, 1.0, 1.1, 0.10, 256, 3.0, 0.955),
    ("t01", "completed", 0.2, 0.5, 0.5, 0.9, 0.05, 512, 3.0, 0.942),
    ("t02", "completed", 0.4, 0.3, 2.0, 1.3, 0.20, 256, 3.0, 0.948),
    ("t03", "completed", 0.6, 0.7, 1.0, 1.0, 0.10, 1024, 3.0, 0.921),
    ("t04", "completed", 0.8, 0.1, 1.5, 1.2, 0.15, 256, 3.0, 0.903),
    ("t05", "completed", 0.9, 0.9, 0.8, 0.8, 0.08, 512, 3.0, 0.861),
    ("t06", "completed", 0.5, 0.5, 1.2, 1.1, 0.12, 256, 8.0, 0.962),
    ("t07", "completed", 0.7, 0.2, 1.0, 0.7, 0.10, 512, 8.0, 0.944),
    ("t08", "stopped", 0.95, 0.4, 1.0, 1.0, 0.10, 256, 3.0, 0.999),  # would dominate
    ("t09", "stopped", 0.3, 0.8, 0.6, 1.4, 0.30, 256, 3.0, 0.612),
    ("t10", "failed", 0.1, 0.6, 1.0, 1.0, 0.50, 256, 3.0, None),
    ("t11", "failed", 0.85, 0.05, 3.0, 0.6, 0.01, 1024, 8.0, None),
]
BEST = "t06"
OPTUNA_FIGURES = {"optuna_parallel_coordinate", "optuna_contour"}  # see execution/test_trackers


def _row(tid: str, status: str, prune: float, drop: float, clip: float, noise: float,
         lr: float, batch: int, eps: float, acc: float | None) -> tuple[dict, list[dict]]:
    n_epochs = {"completed": 5, "stopped": 3, "failed": 1}[status]
    final = acc if acc is not None else 0.3
    epochs = [{"epoch": e, "test_accuracy": final - 0.08 * (n_epochs - e),
               "test_loss": 1.5 - 0.2 * e, "train_loss": 1.6 - 0.2 * e,
               "epsilon_spent": eps * e / 5, "steps": 100 * e, "wall_time_s": 30.0 * e}
              for e in range(1, n_epochs + 1)]
    row = {"trial_id": tid, "status": status, "prune_rate": prune, "drop_rate": drop,
           "clip_norm": clip, "noise_multiplier": noise, "learning_rate": lr,
           "batch_size": batch, "sample_rate": batch / 60000, "epsilon_target": eps,
           "epsilon_spent": epochs[-1]["epsilon_spent"], "delta": 1e-5, "accountant": "prv",
           "steps": 100 * n_epochs, "epochs": float(n_epochs), "density": 1.0 - prune,
           "test_accuracy": acc, "best_test_accuracy": acc, "model": "cnn-mnist",
           "dataset": INJECTED if tid == "t05" else "mnist", "seed": 0,
           "error": f"CUDA OOM {INJECTED}" if status == "failed" else None,
           "finished_at": dt.datetime(2024, 5, 1, 12, int(tid[1:]), tzinfo=dt.timezone.utc)}
    return row, epochs


def _store(path: Path, rows: list[tuple], study: str = "mnist-prune") -> str:
    store = ResultsStore(str(path), study)
    for spec in rows:
        store.add_trial(*_row(*spec))
    store.flush()
    return str(path)


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _store(tmp_path_factory.mktemp("results"), TRIALS)


@pytest.fixture(scope="module")
def html_report(results_dir: str, tmp_path_factory: pytest.TempPathFactory) -> ReportFiles:
    return build_report(results_dir, str(tmp_path_factory.mktemp("out") / "new" / "dir"))


@pytest.fixture(scope="module")
def md_report(results_dir: str, tmp_path_factory: pytest.TempPathFactory) -> ReportFiles:
    return build_report(results_dir, str(tmp_path_factory.mktemp("md")), fmt="md")


def _check_png(path: str) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] >= 200 and image.shape[1] >= 300
    assert image.std() > 0.01  # not a blank canvas


def _section(page: str, heading: str) -> str:
    start = page.index(heading)
    end = page.find("<h2>" if page.startswith("<!DOCTYPE") else "\n## ", start + 1)
    return page[start:end]


class _TagChecker(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.add(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"


def test_html_report_writes_all_figures(html_report: ReportFiles) -> None:
    assert set(html_report.figures) == set(FIGURES) - OPTUNA_FIGURES
    assert set(html_report.skipped) == OPTUNA_FIGURES  # results without an Optuna study
    assert all("no persisted Optuna study" in why for why in html_report.skipped.values())
    for stem, path in html_report.figures.items():
        assert Path(path).name == f"{stem}.png"
        assert Path(path).parent == Path(html_report.page).parent
        _check_png(path)
    assert not list(Path(html_report.page).parent.glob("*.tmp-*"))


def test_html_page_is_standalone_and_valid(html_report: ReportFiles) -> None:
    page = Path(html_report.page).read_text(encoding="utf-8")
    assert Path(html_report.page).name == "report.html"
    assert page.startswith("<!DOCTYPE html>")
    checker = _TagChecker()
    checker.feed(page)
    checker.close()
    assert checker.stack == []
    assert {"html", "head", "body", "table", "img", "figure"} <= checker.tags
    assert not {"script", "link", "iframe"} & checker.tags
    assert "<title>Study report: mnist-prune</title>" in page
    for stem in set(FIGURES) - OPTUNA_FIGURES:
        assert f'<img src="{stem}.png"' in page


def test_html_page_content(html_report: ReportFiles) -> None:
    page = Path(html_report.page).read_text(encoding="utf-8")
    summary = _section(page, "<h2>Summary")
    assert "<td>Trials completed</td><td>8</td>" in summary
    assert "<td>Trials stopped</td><td>2</td>" in summary
    assert "<td>Trials failed</td><td>2</td>" in summary
    assert "<td>Epsilon target</td><td>3, 8</td>" in summary
    assert f"trial {BEST}: test_accuracy 0.962" in summary and "prune_rate=0.5" in summary
    assert "<td>Selected on</td><td>test_accuracy (test split)</td>" in summary  # legacy rows
    top = _section(page, "<h2>Top 10")
    assert top.count("<tr>") == 11  # header + 10 rows
    assert "<th>epsilon_spent</th>" in top and "<th>noise_multiplier</th>" in top
    pareto = _section(page, "<h2>Pareto front")
    assert all(t in pareto for t in (BEST, "t07", "t04", "t05")) and "t00" not in pareto
    assert "t08" not in pareto and "t09" not in pareto and "t10" not in pareto


def test_string_values_are_escaped(html_report: ReportFiles, md_report: ReportFiles) -> None:
    for files in (html_report, md_report):
        page = Path(files.page).read_text(encoding="utf-8")
        assert "<script" not in page
        assert "&lt;script&gt;" in page
        assert "CUDA OOM" in page  # the failed trials' errors are listed


def test_markdown_report(md_report: ReportFiles) -> None:
    page = Path(md_report.page).read_text(encoding="utf-8")
    assert Path(md_report.page).name == "report.md"
    assert page.startswith("# Study report: mnist-prune")
    for stem, caption in FIGURES.items():
        if stem in OPTUNA_FIGURES:
            continue
        assert f"![{caption}]({stem}.png)" in page
        _check_png(md_report.figures[stem])
    assert re.search(r"^\|---\|---\|", page, re.MULTILINE)
    assert BEST in page
    pareto = _section(page, "## Pareto front")
    assert "| t07 |" in pareto and "t08" not in pareto


def test_render_markdown_summary(results_dir: str) -> None:
    text = render_markdown_summary(read_trials(results_dir))
    assert text.splitlines()[0] == "|  | value |"
    assert "| Trials completed | 8 |" in text and f"trial {BEST}" in text


def test_empty_study_gets_a_page(tmp_path: Path) -> None:
    ResultsStore(str(tmp_path / "res"), "empty").flush()
    files = build_report(str(tmp_path / "res"), str(tmp_path / "out"))
    page = Path(files.page).read_text(encoding="utf-8")
    assert files.figures == {} and not list((tmp_path / "out").glob("*.png"))
    assert "Nothing to plot yet" in page and "Study report: res" in page
    assert "no completed trial yet" in page


def test_no_completed_trials(tmp_path: Path) -> None:
    _store(tmp_path / "res", [t for t in TRIALS if t[1] != "completed"], study="bad")
    files = build_report(f"file://{tmp_path / 'res'}", str(tmp_path / "out"), fmt="md")
    page = Path(files.page).read_text(encoding="utf-8")
    assert "No completed trials yet" in page and "Study report: bad" in page
    assert set(files.figures) == {"accuracy_vs_prune_rate", "accuracy_vs_drop_rate",
                                  "learning_curves", "privacy_utility"}  # stopped trials only
    assert "pareto_front" in files.skipped and "param_importances" in files.skipped


def test_single_trial_skips_importances(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "param_importances.png").write_bytes(PNG_SIGNATURE)  # stale, from an older run
    _store(tmp_path / "res", TRIALS[:1])
    files = build_report(str(tmp_path / "res" / "trials.parquet"), str(out))
    assert set(files.skipped) == {"param_importances", *OPTUNA_FIGURES}
    assert "2 completed trials" in files.skipped["param_importances"]
    assert not (out / "param_importances.png").exists()
    page = Path(files.page).read_text(encoding="utf-8")
    assert "param_importances.png not drawn" in page and 'src="param_importances.png"' not in page
    for path in files.figures.values():
        _check_png(path)


def test_study_selection_and_objectives(tmp_path: Path) -> None:
    res = tmp_path / "res"
    _store(res, TRIALS[:4], study="a")
    _store(res, TRIALS[4:8], study="b")
    with pytest.raises(ValueError, match="several studies"):
        build_report(str(res), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="no study 'c'"):
        build_report(str(res), str(tmp_path / "out"), study="c")
    objectives = [("test_accuracy", "max"), ("epsilon_spent", "min"), ("density", "min")]
    files = build_report(str(res), str(tmp_path / "out"), study="b", pareto=objectives)
    page = Path(files.page).read_text(encoding="utf-8")
    assert "Study report: b" in page and "t04" in page and "t00" not in page
    assert "test_accuracy max, epsilon_spent min, density min" in page
    _check_png(files.figures["pareto_front"])
    with pytest.raises(ValueError, match="unknown report format"):
        build_report(str(res), str(tmp_path / "out"), study="b", fmt="pdf")


def test_report_says_how_the_noise_was_seeded(tmp_path: Path) -> None:
    store = ResultsStore(str(tmp_path / "r"), "seeded")
    for i, flag in enumerate((False, True, False)):
        row, epochs = _row(f"t{i:02d}", "completed", 0.1, 0.1, 1.0, 1.0, 0.1, 256, 3.0, 0.9)
        store.add_trial({**row, "reproducible_noise": flag}, epochs)
    store.flush()
    summary = render_markdown_summary(read_trials(str(tmp_path / "r")))
    assert "reproducible_noise in 1 of 3 trials" in summary
    assert "assumes that seed stays secret" in summary
    page = build_report(str(tmp_path / "r"), str(tmp_path / "out"), fmt="md").page
    assert "assumes that seed stays secret" in Path(page).read_text()

    store = ResultsStore(str(tmp_path / "s"), "secret")
    row, epochs = _row("t00", "completed", 0.1, 0.1, 1.0, 1.0, 0.1, 256, 3.0, 0.9)
    store.add_trial({**row, "reproducible_noise": False}, epochs)
    store.flush()
    assert "secret seed per trial" in render_markdown_summary(read_trials(str(tmp_path / "s")))
