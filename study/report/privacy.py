"""The privacy sections of a study report: how the DP noise was seeded, the study-level
(epsilon, delta) under both release models, and the empirical audits (claimed vs audited
epsilon). Blocks are ``(kind, ...)`` tuples that :mod:`study.report.html` renders."""

from __future__ import annotations

import pandas as pd

from study.analysis.query import to_frame
from study.storage.audits import read_audits


def facts_table(rows: list[tuple[str, str]]) -> pd.DataFrame:
    """(label, value) rows as a two-column table (the report's summary and privacy tables)."""
    return pd.DataFrame(rows, columns=["", "value"], dtype=object)


def noise_note(trials: pd.DataFrame) -> str:
    """How the trials' DP noise was seeded, and what the guarantee then assumes."""
    flags = trials["reproducible_noise"] if "reproducible_noise" in trials else pd.Series([])
    seeded = int((flags == True).sum())  # noqa: E712 (nullable column: True, False or NA)
    if seeded:
        return (f"reproducible_noise in {seeded} of {len(trials)} trials: their noise is "
                f"seeded from the recorded seed, so each trial's guarantee assumes that seed "
                f"stays secret, and no study-level bound holds (trials share their noise)")
    if flags.isna().all() and len(trials):
        return "not recorded (results written before the reproducible_noise column)"
    return "secret seed per trial (OS randomness, kept only in private checkpoints)"


#: The columns of ``audits.parquet`` the report shows.
AUDIT_COLUMNS = ("audit_id", "trial_id", "mode", "canaries", "confidence", "epsilon_claimed",
                 "epsilon_audited", "violation", "finished_at")


def audit_blocks(uri: str, study: str) -> list[tuple]:
    """Claimed vs audited epsilon of the study's audits (``audits.parquet``), if any."""
    directory = uri.rsplit("/", 1)[0] if uri.endswith(".parquet") else uri
    try:
        audits = to_frame(read_audits(directory))
    except FileNotFoundError:
        return []
    audits = audits[audits["study"] == study]
    if not len(audits):
        return []
    return [("h2", "Privacy audits: claimed vs audited epsilon"),
            ("p", "Audited epsilon is an empirical lower bound at the stated confidence "
                  "(one-run audit, dpstudy audit); violation = 1 when it exceeds the claim."),
            ("table", audits[list(AUDIT_COLUMNS)])]


def privacy_blocks(results_uri: str, study: str | None = None) -> list[tuple]:
    """The study's (epsilon, delta) under both release models (from the Parquet metadata)."""
    from study.privacy.private_selection import read_study_privacy

    recorded = read_study_privacy(results_uri, study)
    if recorded is None:
        return [("h2", "Study-level privacy"),
                ("p", "Not recorded (results written before study-level accounting).")]
    if recorded.epsilon_all is None:
        reason = "withheld: " + "; ".join(recorded.composition_failed)
        return [("h2", "Study-level privacy"), ("table", facts_table([
            ("Everything released (composition of all trials)", reason),
            ("Only the selected result released (selection bound)", reason)]))]
    runs = "all trials" + (f" and {recorded.audits} audit runs" if recorded.audits else "")
    rows = [(f"Everything released (composition of {runs})",
             f"epsilon {recorded.epsilon_all:.3f}, delta {recorded.delta:g}"),
            ("Only the selected result released (selection bound)",
             "does not apply: " + "; ".join(recorded.failed_assumptions)
             if recorded.epsilon_selected is None else
             f"epsilon {recorded.epsilon_selected:.3f}, delta {recorded.delta:g}")]
    if recorded.not_covered:
        rows.insert(1, ("Not covered by 'everything released' (no noise; private or test data)",
                        ", ".join(recorded.not_covered) + ": publish the table without them"))
    return [("h2", "Study-level privacy"), ("table", facts_table(rows)),
            ("p", "Each trial is (epsilon_spent, delta)-DP on its own; a study runs many "
                  "trials on the same data and selects one. See docs/privacy.md.")]
