"""What `process --template` adds to a run, and whether its forms rows are `template read`'s.

    python benchmarks/process_template.py [--pages 20] [--out benchmarks/results/process_template.json]

Generated filled copies of one layout (synth.make_form_copies) plus a few of another, read by `run_batch`
in this process (jobs=1, so CPU time is this process's; after a warm-up run of one file) without and with
the template; the ratio of the
two CPU times is the figure, measured in the same run. The forms rows are compared with
:func:`hwr_batch.template.read_forms` on the same files.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from PIL import Image

from hwr_batch import template as T
from hwr_batch.classify import load_classifier
from hwr_batch.config import Options
from hwr_batch.mnist import load_idx_pair
from hwr_batch.pipeline import run_batch
from hwr_batch.synth import make_form_copies

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=20)
    parser.add_argument("--others", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    digits = load_idx_pair(FIXTURES / "mnist-test-300-images-idx3-ubyte.gz", FIXTURES / "mnist-test-300-labels-idx1-ubyte.gz")
    copies = make_form_copies(args.pages + 1, digits, layout_seed=5, seed=2)
    others = make_form_copies(args.others, digits, layout_seed=9, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        scans = root / "scans"
        scans.mkdir()
        for i, (img, _) in enumerate(copies[1:] + others):
            Image.fromarray(img).save(scans / f"p{i:03d}.png", dpi=(300, 300))
        form = root / "form.toml"
        form.write_text(T.dumps(T.create_template(copies[0][0], dpi=300, name="form")))
        run_batch(Options(inputs=(scans / "p000.png",), out_dir=root / "warm-up", jobs=1, templates=(form,)))
        seconds = {}
        for label, templates in (("plain", ()), ("template", (form,))):
            started = time.process_time()
            report = run_batch(Options(inputs=(scans,), out_dir=root / label, jobs=1, templates=templates))
            seconds[label] = time.process_time() - started
        forms = pd.read_csv(root / "template" / "forms.csv", dtype=str, keep_default_na=False)
        rows, _ = T.read_forms(sorted(scans.iterdir()), [T.load(form)], load_classifier())
        expected = pd.DataFrame(rows["form"], columns=T.form_columns(T.load(form))).astype(str)
    result = {
        "pages": args.pages, "other_layout_pages": args.others,
        "registered": int((forms["status"] == "read").sum()),
        "unregistered": int((forms["status"] == "unregistered").sum()),
        "rows_equal_template_read": bool(forms.equals(expected)),
        "unregistered_pages_reported": report.unregistered_pages,
        "cpu_seconds": {k: round(v, 2) for k, v in seconds.items()},
        "cpu_ratio_template_to_plain": round(seconds["template"] / seconds["plain"], 2),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
