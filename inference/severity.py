"""Severity from the infected share of each lung.

Scale: the chest radiograph extent score of Wong HYF, Lam HYS, Fong AH, et al. "Frequency and
Distribution of Chest Radiographic Findings in Patients Positive for COVID-19". Radiology
2020;296(2):E72-E78, doi:10.1148/radiol.2020201160 (a modified RALE score). Each lung scores 0-4
by the extent of involvement by consolidation or ground-glass opacity: 0 none, 1 <25%,
2 25-50%, 3 50-75%, 4 >75%; the two lung scores are summed (0-8).

Here "extent" is the share of the lung mask covered by the predicted infection mask, which is a
model estimate and not a radiologist's reading. The grade names for the total score
(none 0, mild 1-2, moderate 3-5, severe 6-8) are this project's banding, not part of the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

# Our noise floor, not part of the published scale: a few stray infection pixels (<1% of a lung)
# are far more likely segmentation noise than real involvement, so they score 0 ("none").
NOISE_FLOOR_PERCENT = 1.0

GRADES: tuple[tuple[int, int, str], ...] = (
    (0, 0, "none"),
    (1, 2, "mild"),
    (3, 5, "moderate"),
    (6, 8, "severe"),
)
GRADE_NAMES: tuple[str, ...] = tuple(name for _, _, name in GRADES)
SCALE_NAME = "CXR extent score (modified RALE), Wong et al., Radiology 2020;296:E72-E78"


def lung_score(percent: float) -> int:
    """Extent score 0-4 of one lung from its infected share in percent.

    The paper's bands overlap at their edges; we use half-open bands so each value has one score:
    [0, 1) -> 0 (noise floor), [1, 25) -> 1, [25, 50) -> 2, [50, 75] -> 3, (75, 100] -> 4.
    """
    if not 0.0 <= percent <= 100.0:
        raise ValueError(f"percent must be in [0, 100], got {percent}")
    if percent < NOISE_FLOOR_PERCENT:
        return 0
    if percent < 25.0:
        return 1
    if percent < 50.0:
        return 2
    if percent <= 75.0:
        return 3
    return 4


def grade(total: int) -> str:
    for low, high, name in GRADES:
        if low <= total <= high:
            return name
    raise ValueError(f"total score must be 0-8, got {total}")


@dataclass(frozen=True)
class Severity:
    score_left: int
    score_right: int
    score: int  # 0-8
    grade: str


def severity(percent_left: float, percent_right: float) -> Severity:
    """Per-lung infected shares (patient's left and right, percent) -> scores and grade."""
    left, right = lung_score(percent_left), lung_score(percent_right)
    return Severity(left, right, left + right, grade(left + right))
