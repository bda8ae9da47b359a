"""Published accuracies (%) that the paper-layout report (report_paper.py) sets beside ours.

Only numbers read from a source are here, each entry with the source it was read from (`cite`):

- "paper": Fan et al., "When Does Contrastive Learning Preserve Adversarial Robustness from Pretraining to
  Finetuning?", NeurIPS 2021, arXiv:2111.01124. The paper's tables (1, 2, 4, 5) have still not been read: its
  text is among the stored pages of the project's search tool (the ar5iv HTML,
  https://ar5iv.labs.arxiv.org/html/2111.01124, and the SPIQA data set's raw LaTeX of 2111.01124v1), but that
  tool answers with each page's opening only (title, abstract, start of the introduction), never the tables,
  whatever the query. So only AdvCL's own SLF rows are here: CIFAR-10 SA 80.85 / RA 50.45 as quoted from the
  paper in the authors' issue tracker, and the AA and CIFAR-100 values as the project's DESIGN.md §1 states
  them. Values not read from a primary source are listed in `unchecked`; reports mark them "*". Add the other
  rows of Tables 1, 2, 4 and 5 here, with their page, once read from the paper itself (e.g. the PDF).
- "leaderboard": the RobustSSL benchmark (https://robustssl.github.io/, the address its model zoo's README,
  GodXuxilie/RobustSSL_Benchmark, gives; the numbers read from the data files of the GitHub repository
  RobustSSL/RobustSSL.github.io, leaderboard/<pretrain>-<downstream>-<mode>.js at the commit named in each
  `cite`): ResNet-18, "vanilla fine-tuning" columns; its robust accuracy is AutoAttack (standard), so it
  fills AA (and SA); it has no PGD-20 column (RA stays None). Its rows name papers, not variants: the
  DynACL paper's row with the note "Using post-processing" is DynACL++, without it DynACL; the AIR paper's
  (Xu et al., NeurIPS 2023) rows likewise DynACL-AIR++ / DynACL-AIR. Its AdvCL rows carry the note "Using
  ImageNet-1K pre-trained models" (an ImageNet f_pre for the pseudo-labels).
"""
from __future__ import annotations

from dataclasses import dataclass

LEADERBOARD_URL = "https://robustssl.github.io/"
LEADERBOARD_REPO = "RobustSSL/RobustSSL.github.io"
PAPER = "Fan et al., NeurIPS 2021 (arXiv:2111.01124)"
SOURCES = ("paper", "leaderboard")


@dataclass(frozen=True)
class Published:
    table: str  # the paper-layout table the row belongs to: table1 | table2 | table4 | table5
    row: str  # the method or variant name (table1, table2), or the ablation setting's label (table4, table5)
    dataset: str  # evaluation dataset; "<pretraining>→<evaluation>" for transfer (table2)
    finetune: str  # SLF | ALF | AFF
    source: str  # paper | leaderboard
    AA: float | None
    RA: float | None
    SA: float | None
    cite: str  # where these numbers were read
    unchecked: tuple[str, ...] = ()  # metrics not read from a primary source (reports mark them "*")

    def value(self, metric: str) -> float | None:
        return getattr(self, metric)


ISSUE_6 = "https://github.com/LijieFan/AdvCL/issues/6"
DESIGN = "the project's DESIGN.md §1 ('Paper targets'), also in configs/cifar{10,100}_advcl.yaml"

PAPER_ROWS = (
    Published("table1", "advcl", "cifar10", "SLF", "paper", AA=42.57, RA=50.45, SA=80.85,
              cite=f"{PAPER}, Table 1 (CIFAR-10, SLF): SA 80.85 and PGD-20 RA 50.45 as quoted from the paper in "
                   f"{ISSUE_6}; AA 42.57 from {DESIGN}", unchecked=("AA",)),
    Published("table1", "advcl", "cifar100", "SLF", "paper", AA=19.78, RA=27.67, SA=48.34,
              cite=f"{PAPER}, Table 1 (CIFAR-100, SLF), from {DESIGN}", unchecked=("AA", "RA", "SA")),
)

# (dataset as our reports name it, leaderboard file stem, the file's commit) → {row: (AA, SA)}, read from
# the `scheduleData` entries' ra1 (AutoAttack) and sa1 (standard accuracy) of vanilla fine-tuning.
_BOARD: dict[tuple[str, str, str], dict[str, dict[str, tuple[float, float]]]] = {
    ("cifar10", "cifar10-cifar10", "5fc1ff33d2581cd18b738e247f4c5752ae73d95f"): {
        "SLF": {"dynacl_air++": (46.99, 81.80), "dynacl++": (46.54, 79.82), "dynacl_air": (45.17, 78.08),
                "dynacl": (45.09, 75.41), "deacl": (43.27, 79.94), "advcl": (43.18, 82.36), "acl": (39.17, 78.22),
                "rocl": (26.12, 77.90)},
        "ALF": {"dynacl_air++": (48.23, 79.56), "dynacl++": (47.98, 78.81), "dynacl_air": (46.14, 77.42),
                "dynacl": (45.67, 72.97), "advcl": (44.05, 80.04), "deacl": (41.99, 77.71), "acl": (40.60, 75.53),
                "rocl": (29.69, 75.62)},
        "AFF": {"dynacl_air++": (50.79, 82.36), "dynacl_air": (50.58, 82.74), "dynacl": (50.52, 81.86),
                "dynacl++": (50.34, 81.93), "advcl": (49.61, 83.00), "acl": (49.60, 81.25), "rocl": (45.02, 78.51),
                "deacl": (44.96, 78.29)},
    },
    ("cifar100", "cifar100-cifar100", "5fc1ff33d2581cd18b738e247f4c5752ae73d95f"): {
        "SLF": {"dynacl_air++": (20.61, 53.93), "dynacl_air": (20.13, 46.19), "dynacl++": (20.07, 52.16),
                "dynacl": (19.30, 45.83), "advcl": (19.10, 44.60), "acl": (17.30, 45.82), "rocl": (8.72, 42.93)},
    },
    ("cifar100", "cifar100-cifar100", "88ae99e7cbd5da5e21f67b9b382424b38996ea1d"): {
        "ALF": {"dynacl_air++": (22.96, 52.09), "dynacl++": (22.24, 49.92), "dynacl_air": (21.53, 45.46),
                "dynacl": (20.69, 43.58), "acl": (19.07, 43.49), "advcl": (18.19, 39.85)},
    },
    ("cifar100", "cifar100-cifar100", "4a38978c215bb9b6f2c34b50a5425cd2eed6f67d"): {
        "AFF": {"dynacl_air": (25.97, 57.75), "dynacl_air++": (25.58, 57.57), "advcl": (25.26, 58.29),
                "dynacl++": (25.21, 57.30), "dynacl": (24.88, 57.43), "acl": (24.78, 57.74)},
    },
    ("cifar10→stl10", "cifar10-stl10", "07854840cdbb1debc0191fa36b16243d6f4c6327"): {
        "SLF": {"dynacl_air": (29.64, 55.84), "dynacl": (29.17, 52.41), "advcl": (28.38, 62.78),
                "acl": (27.52, 56.50), "deacl": (11.04, 38.49)},
        "ALF": {"dynacl_air": (31.24, 57.14), "dynacl": (29.59, 49.55), "acl": (28.16, 60.86),
                "advcl": (27.88, 58.73), "deacl": (12.70, 39.41)},
        "AFF": {"dynacl_air": (35.66, 63.74), "dynacl": (35.25, 63.53), "advcl": (33.84, 68.14),
                "acl": (32.66, 61.41), "deacl": (24.66, 48.01)},
    },
    ("cifar100→stl10", "cifar100-stl10", "07854840cdbb1debc0191fa36b16243d6f4c6327"): {
        "SLF": {"dynacl_air": (23.24, 48.20), "dynacl": (23.17, 47.54), "acl": (21.91, 47.59),
                "advcl": (18.06, 49.80)},
        "ALF": {"dynacl_air": (26.60, 48.55), "dynacl": (26.24, 45.70), "acl": (24.40, 45.24),
                "advcl": (19.60, 44.54)},
        "AFF": {"dynacl_air": (31.42, 58.59), "dynacl": (31.17, 58.35), "advcl": (30.50, 61.24),
                "acl": (28.76, 56.23)},
    },
}


def _leaderboard_rows() -> tuple[Published, ...]:
    rows = []
    for (dataset, stem, commit), modes in _BOARD.items():
        table = "table2" if "→" in dataset else "table1"
        for mode, entries in modes.items():
            cite = (f"RobustSSL leaderboard {LEADERBOARD_URL} ({dataset}, {mode}, vanilla fine-tuning, AutoAttack): "
                    f"{LEADERBOARD_REPO} leaderboard/{stem}-{mode}.js @ {commit[:8]}")
            rows += [Published(table, row, dataset, mode, "leaderboard", AA=aa, RA=None, SA=sa, cite=cite)
                     for row, (aa, sa) in entries.items()]
    return tuple(rows)


PUBLISHED: tuple[Published, ...] = PAPER_ROWS + _leaderboard_rows()


def lookup(table: str, row: str, dataset: str, finetune: str, source: str) -> Published | None:
    """The published entry for one cell of a paper-layout table, None when that source has none."""
    for entry in PUBLISHED:
        if (entry.table, entry.row, entry.dataset, entry.finetune, entry.source) == (
                table, row, dataset, finetune.upper(), source):
            return entry
    return None


def entries(table: str) -> list[Published]:
    return [e for e in PUBLISHED if e.table == table]
