"""Small inputs in the public release formats of T2Ranking and DPR's Wikipedia-NQ.

Written by tests into a temp folder (the real files are GBs): same file names, columns,
headers and quoting as the releases.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

TOPICS = [
    ("熊猫", "大熊猫主要生活在中国四川的山区，以竹子为主要食物。", "大熊猫吃什么"),
    ("长城", "长城是中国古代修建的军事防御工程，全长两万多公里。", "长城有多长"),
    ("茶", "绿茶是未经发酵的茶叶，龙井是著名的绿茶品种。", "龙井属于什么茶"),
    ("火箭", "火箭依靠燃料燃烧产生的推力进入太空轨道。", "火箭如何进入太空"),
    ("咖啡", "咖啡豆经过烘焙和研磨后可以冲泡成咖啡。", "咖啡是怎么做的"),
    ("钢琴", "钢琴有八十八个琴键，分为黑键和白键。", "钢琴有几个键"),
    ("地震", "地震是地壳快速释放能量时产生的震动。", "地震是怎么产生的"),
    ("雨林", "亚马孙雨林是世界上面积最大的热带雨林。", "最大的热带雨林在哪里"),
]


def write_t2ranking(folder: Path) -> dict[str, int]:
    """A T2Ranking-shaped release: 8 topics x 2 passages + 1 blank passage; 6 train, 2 dev queries.

    Headers as on Hugging Face for some files, none for others (the GitHub scripts' form).
    Returns the row counts the prepare step must account for.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["pid\tpara"]
    for i, (name, text, _) in enumerate(TOPICS):
        lines.append(f"{100 + 2 * i}\t{text}")
        lines.append(f"{101 + 2 * i}\t{name}的其他资料：这里记录了与{name}相关\t但并不直接回答问题的内容。")  # tab inside
    lines.append("999\t")  # the release has blank passages
    (folder / "collection.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    train, dev = list(range(6)), [6, 7]
    (folder / "queries.train.tsv").write_text(
        "qid\ttext\n" + "".join(f"{1000 + i}\t{TOPICS[i][2]}\n" for i in train), encoding="utf-8")
    (folder / "queries.dev.tsv").write_text("".join(f"{2000 + i}\t{TOPICS[i][2]}\n" for i in dev), encoding="utf-8")
    # retrieval qrels: the answering passage; query 1000 also names the blank passage 999
    (folder / "qrels.retrieval.train.tsv").write_text(
        "qid\tpid\n" + "".join(f"{1000 + i}\t{100 + 2 * i}\n" for i in train) + "1000\t999\n", encoding="utf-8")
    (folder / "qrels.retrieval.dev.tsv").write_text(
        "qid\tpid\n" + "".join(f"{2000 + i}\t{100 + 2 * i}\n" for i in dev), encoding="utf-8")
    graded = ["qid\t-\tpid\trel"]
    for i in train:
        graded += [f"{1000 + i}\t0\t{100 + 2 * i}\t3", f"{1000 + i}\t0\t{101 + 2 * i}\t1",
                   f"{1000 + i}\t0\t{100 + 2 * ((i + 1) % 8)}\t0"]
    (folder / "qrels.train.tsv").write_text("\n".join(graded) + "\n", encoding="utf-8")
    graded_dev = ["qid\t-\tpid\trel"] + [f"{2000 + i}\t0\t{100 + 2 * i}\t2" for i in dev] + \
                 [f"{2000 + i}\t0\t{101 + 2 * i}\t1" for i in dev]
    (folder / "qrels.dev.tsv").write_text("\n".join(graded_dev) + "\n", encoding="utf-8")
    return {"passages": 17, "blank": 1, "train_rows": 7, "dev_rows": 2, "train_queries": 6, "dev_queries": 2}


EN = [
    ("Aaron", "Aaron is a prophet, high priest, and the brother of Moses in the Abrahamic religions.",
     "who was the brother of moses"),
    ("Saturn", "Saturn is the sixth planet from the Sun and has a prominent ring system.", "which planet has rings"),
    ("Python (programming language)", "Python is a programming language that emphasises code readability.",
     "what language emphasises readability"),
    ("Mount Everest", "Mount Everest is Earth's highest mountain above sea level, in the Himalayas.",
     "what is the highest mountain"),
    ("Photosynthesis", "Photosynthesis is how plants turn light into chemical energy.", "how do plants make energy"),
    ("Nile", "The Nile is a major north-flowing river in northeastern Africa.", "which river flows north in africa"),
    ("Tea", "Tea is an aromatic beverage made by pouring hot water over cured leaves.", "how is tea made"),
    ("Volcano", "A volcano is a rupture in the crust through which lava escapes.", "what comes out of a volcano"),
]


def _ctx(pid: int, key: str = "passage_id") -> dict:
    title, text, _ = EN[pid % len(EN)] if pid < len(EN) else (f"Filler {pid}", f"Filler passage number {pid}.", "")
    return {"title": title, "text": text, "score": 10.0, "title_score": 0, key: str(pid + 1)}


def write_nq(folder: Path) -> dict[str, int]:
    """DPR-shaped NQ: psgs_w100.tsv (header, CSV quotes) + biencoder-nq-{train,dev}.json.

    Passage ids are 1-based like the release. Train: 6 questions with a positive (one with two),
    1 without any positive; dev: 2 questions.
    """
    folder.mkdir(parents=True, exist_ok=True)
    n_passages = 30
    with (folder / "psgs_w100.tsv").open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(["id", "text", "title"])
        for pid in range(n_passages):
            ctx = _ctx(pid)
            text = ctx["text"] if pid else 'Aaron ( or ; "Ahärôn") ' + ctx["text"]  # quotes as in the release
            w.writerow([ctx["passage_id"], text, ctx["title"]])

    def question(i: int, positives: list[int], key: str = "passage_id") -> dict:
        return {"dataset": "nq_train_psg", "question": EN[i][2], "answers": [EN[i][0]],
                "positive_ctxs": [_ctx(p, key) for p in positives],
                "negative_ctxs": [_ctx(20 + i)],
                "hard_negative_ctxs": [_ctx((i + 1) % 8), _ctx(10 + i), _ctx(positives[0])]}

    train = [question(i, [i], key="psg_id" if i == 3 else "passage_id") for i in range(6)]
    train[0]["positive_ctxs"].append(_ctx(12))
    train.append({**question(6, [6]), "positive_ctxs": []})  # DPR keeps some with no positive
    (folder / "biencoder-nq-train.json").write_text(json.dumps(train, indent=4, ensure_ascii=False), encoding="utf-8")
    dev = [question(i, [i]) for i in (6, 7)]
    (folder / "biencoder-nq-dev.json").write_text(json.dumps(dev, indent=4), encoding="utf-8")
    return {"passages": n_passages, "train_questions": 7, "with_positive": 6, "train_positives": 7, "dev_questions": 2}
