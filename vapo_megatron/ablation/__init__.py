"""The paper's Table 1 in miniature: grids of variants (grid), a resumable subprocess runner (runner), the report
(report) and the command line of tools/run_ablation.py (cli)."""
