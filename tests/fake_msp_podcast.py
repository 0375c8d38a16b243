"""A fake MSP-Podcast release tree in the release's formats (see mmser/data/msp_podcast.py for
what was checked against public descriptions): Labels/labels_consensus.csv with the columns
FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set; Audios/<FileName> (16 kHz mono
16-bit WAVs, short tones); Transcripts/<stem>.txt.

`make_fake_msp_podcast(root)` returns the root and the rows written, so tests can count.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf
from helpers import tone

HEADER = ["FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set"]
# Per split: (speakers, EmoClass codes of each speaker's turns). Every one of the 10 codes occurs;
# Test3 turns have no label (hidden in the release), and one Train speaker is unknown.
LAYOUT = {
    "Train": (["0001", "0002", "Unknown"], "NNHHSSAAUCDFOX"),
    "Development": (["0003"], "NHSAUCDFO"),
    "Test1": (["0004", "0005"], "NHSAUCDFX"),
    "Test2": (["0006"], "NHSAUCDF"),
    "Test3": (["0007"], "----"),  # no labels: EmoClass empty
}
FREQS = {"N": 220.0, "H": 880.0, "S": 440.0, "A": 1760.0, "U": 1320.0, "C": 660.0, "D": 990.0, "F": 1980.0,
         "O": 3000.0, "X": 3300.0, "-": 2500.0}


def make_fake_msp_podcast(root: str | Path, seed: int = 0, labels_name: str = "labels_consensus.csv",
                          transcripts: bool = True) -> tuple[Path, list[dict]]:
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "Labels").mkdir(parents=True, exist_ok=True)
    (root / "Audios").mkdir(exist_ok=True)
    if transcripts:
        (root / "Transcripts").mkdir(exist_ok=True)
    rows = []
    podcast = 0
    for split, (speakers, codes) in LAYOUT.items():
        for spk in speakers:
            podcast += 1
            for k, code in enumerate(codes):
                name = f"MSP-PODCAST_{podcast:04d}_{k + 1:04d}.wav"
                sf.write(str(root / "Audios" / name), tone(FREQS[code], float(rng.uniform(0.2, 0.4)), rng), 16000,
                         subtype="PCM_16")
                if transcripts:
                    (root / "Transcripts" / f"{name[:-4]}.txt").write_text(f"turn {k} of podcast {podcast}\n")
                labelled = code != "-"
                rows.append({"FileName": name, "EmoClass": code if labelled else "",
                             "EmoAct": f"{rng.uniform(1, 7):.1f}" if labelled else "",
                             "EmoVal": f"{rng.uniform(1, 7):.1f}" if labelled else "",
                             "EmoDom": f"{rng.uniform(1, 7):.1f}" if labelled else "",
                             "SpkrID": spk if split != "Test3" else "", "Gender":
                             ("Unknown" if spk == "Unknown" else "Female" if int(spk) % 2 else "Male")
                             if split != "Test3" else "", "Split_Set": split})
    with open(root / "Labels" / labels_name, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HEADER)
        w.writeheader()
        w.writerows(rows)
    return root, rows
