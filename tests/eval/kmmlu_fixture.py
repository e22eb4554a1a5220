"""A small hand-written Korean multiple-choice set in the KMMLU layout (written into tmp, never committed),
used by the KMMLU tests and the real-shape tier tests."""

from __future__ import annotations

import csv
from pathlib import Path

HEADER = ["question", "answer", "A", "B", "C", "D", "Category", "Human Accuracy"]

# (question, [A, B, C, D], answer 1-4). Korean-History and Fashion are written by hand; Math and
# Geomatics are generated below. Odd cells on purpose: a question with surrounding spaces (stripped by
# the prompt), an option with a trailing space (kept), an empty option (the hub loader reads None).
KOREAN_HISTORY_DEV = [
    ("고려를 세운 인물은?", ["궁예", "왕건", "견훤", "이성계"], 2),
    ("훈민정음을 반포한 왕은?", ["태종", "세조", "세종", "성종"], 3),
    ("임진왜란이 일어난 해는?", ["1392년", "1592년", "1636년", "1910년"], 2),
    ("신라의 삼국 통일을 이룬 왕은?", ["문무왕", "진흥왕", "법흥왕", "지증왕"], 1),
    ("대한민국 임시정부가 수립된 도시는?", ["베이징", "도쿄", "상하이", "블라디보스토크"], 3),
]
KOREAN_HISTORY_TEST = [
    ("조선을 건국한 인물은?", ["이성계", "왕건", "세종", "정도전"], 1),
    ("  거북선과 관련이 깊은 인물은?  ", ["강감찬", "이순신", "을지문덕", "권율"], 2),
    ("3·1 운동이 일어난 해는?", ["1910년", "1919년", "1945년", "1950년"], 2),
    ("고구려를 세운 인물은?", ["온조", "박혁거세", "주몽", "김수로"], 3),
    ("팔만대장경이 보관된 사찰은?", ["불국사", "해인사", "통도사", "송광사"], 2),
    ("갑오개혁이 시작된 해는?", ["1876년", "1884년", "1894년", "1897년"], 3),
    ("발해를 세운 인물은?", ["대조영", "김유신", "계백", "장보고"], 1),
    ("광복을 맞은 해는?", ["1919년", "1945년", "1948년", "1953년"], 4),
]
FASHION_DEV = [
    ("한복 저고리의 앞을 여미는 끈은?", ["고름", "깃", "동정", "섶"], 1),
    ("면 섬유의 원료는?", ["누에고치", "목화", "양털", "아마"], 2),
    ("데님 원단에 주로 쓰는 염료 색은?", ["빨강", "노랑", "남색", "초록"], 3),
    ("정장 바지 허리 둘레를 재는 단위로 흔히 쓰는 것은?", ["인치", "리터", "그램", "와트"], 1),
    ("실크의 원료는?", ["목화", "누에고치", "마", "석유"], 2),
]
FASHION_TEST = [
    ("땀 흡수가 가장 좋은 소재는?", ["폴리에스터", "면 ", "나일론", "아크릴"], 2),
    ("겨울 외투에 보온용으로 넣는 것은?", ["오리털", "종이", "비닐", "금속"], 1),
    ("치마 길이가 무릎 위인 스타일은?", ["맥시", "미디", "미니", ""], 3),
    ("세탁 기호에서 손빨래를 뜻하는 그림은?", ["손이 담긴 대야", "삼각형", "다리미", "원"], 1),
    ("옷감의 가로 방향 실을 무엇이라 하는가?", ["날실", "씨실", "바늘", "단추"], 2),
]


def _math(n: int, seed: int, decimals: bool) -> list[tuple[str, list, int]]:
    """Sums with numeric options (whole numbers, or decimals written like 2.50) and varied answer letters."""
    rows = []
    for i in range(n):
        a, b = 3 + 7 * i + seed, 5 + 3 * i
        right = a + b
        opts = [right - 2, right + 1, right + 3, right - 1]
        ans = (i * 3 + seed) % 4  # 0-based position of the right sum: A D C B A D ... for seed 0
        opts[ans] = right
        cells = [f"{o / 4:.2f}" for o in opts] if decimals else [str(o) for o in opts]
        q = f"{a / 4:.2f}와 {b / 4:.2f}의 합은?" if decimals else f"{a}와 {b}의 합은 얼마인가?"
        rows.append((q, cells, ans + 1))
    return rows


# Math's train split is the first split of its config, so it fixes the column types (as on the hub):
# A becomes text (one non-number), B-D decimals. Dev then prints 3.00 in A as "3" (Arrow's number ->
# text cast) and the test's whole numbers in B-D as "9.0".
MATH_TRAIN = [
    ("0.50와 0.25의 합은?", ["0.75", "1.00", "0.50", "1.25"], 1),
    ("1과 1의 합은?", ["없음", "2.0", "3.5", "1.5"], 2),
    ("2.5와 2.5의 합은?", ["4.5", "6.0", "5.0", "5.5"], 3),
]


def _geomatics(n: int) -> list[tuple[str, list, int]]:
    rows = []
    for i in range(n):
        scale = [1000, 5000, 25000, 50000, 10000, 2000][i % 6]
        right = scale // 100
        opts = [f"{right}m", f"{right * 10}m", f"{right // 10}m", f"{right * 100}m"]
        ans = [1, 0, 3, 1, 2, 1][i % 6]  # answers B A D B C B: half of them B
        opts[0], opts[ans] = opts[ans], opts[0]
        rows.append((f"축척 1:{scale} 지도에서 1cm는 실제로 몇 m인가?", opts, ans + 1))
    return rows


def write_subject(root: Path, subject: str, category: str, splits: dict[str, list]) -> None:
    for split, rows in splits.items():
        with open(root / f"{subject}-{split}.csv", "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(HEADER)
            for q, opts, ans in rows:
                w.writerow([q, ans, *opts, category, "0.5"])


def write_kmmlu_fixture(root: Path) -> Path:
    """Four subjects, one per category; 29 test and 20 dev questions in all, train files for two."""
    root.mkdir(parents=True, exist_ok=True)
    math_dev = [("0.75와 2.25의 합은?", ["3.00", "2.75", "3.25", "3.50"], 1), *_math(4, 1, True)]
    write_subject(root, "Math", "STEM", {"train": MATH_TRAIN, "dev": math_dev, "test": _math(10, 0, False)})
    history = {"train": KOREAN_HISTORY_DEV[:2], "dev": KOREAN_HISTORY_DEV, "test": KOREAN_HISTORY_TEST}
    write_subject(root, "Korean-History", "HUMSS", history)
    write_subject(root, "Geomatics", "Applied Science", {"dev": _geomatics(5), "test": _geomatics(6)})
    write_subject(root, "Fashion", "Other", {"dev": FASHION_DEV, "test": FASHION_TEST})
    return root
