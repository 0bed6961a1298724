"""Render the shipped example images (test split, seed 0) and examples.json / README table.

    python examples/make_examples.py [--indices 0,1,7,3,4]

Images come from `ep_jax.data.scenes` (test-split photos, never seen in training).
"""

import argparse
import json
from pathlib import Path

from PIL import Image

from ep_jax.data import scenes

HERE = Path(__file__).resolve().parent


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--indices", default="0,1,7,3,4")
    args = p.parse_args(argv)
    records = []
    for i in (int(x) for x in args.indices.split(",")):
        s = scenes.make_sample("test", i, seed=0, image_size=224)
        name = f"scene_{s.qtype}_{i:04d}.png"
        Image.fromarray(s.image).save(HERE / name)
        records.append({"file": name, "question": s.question, "answer": s.answer, "qtype": s.qtype,
                        "split": "test", "seed": 0, "index": i, "background": s.background})
    (HERE / "examples.json").write_text(json.dumps(records, indent=1) + "\n")
    print(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
