"""Run the VAPO ablation grid and write its report (logic in vapo_megatron/ablation/; see docs/ablation_howto.md).

    python tools/run_ablation.py --grid examples/ablation/grid.yaml --seeds 0 1 2 --jobs 2 --out runs/ablation
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vapo_megatron.ablation.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
